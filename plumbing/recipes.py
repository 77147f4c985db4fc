"""The recipes: what each training stage trains, on what, with which weights and lr (STAGES, the
official ones), a preset's named deviations from them (RECIPES), and the curriculum `python
train.py` runs through them (CURRICULA). Data, read by train.py; change a stage here.
"""


DEFAULT_PRESET = "toy"  # the shapes world: what `python train.py` trains (weights/toy/)
# The official stages (DreamLLM sec. 3.2; RunpeiDong/DreamLLM's projects/dreamllm/configs/ and
# scripts/train/dreamllm/): what trains, the two losses' weights, the peak lr, and the mix of kinds
# of example it cycles over (data.KINDS, each laid out as dreamllm.LAYOUTS says): a list, or {kind:
# weight} in the proportions of the official config's size_list (cycle()). CLIP, the VAE and
# the UNet never train. "new_tokens", the embedding and LM-head rows of <dream_start> & co. alone,
# is a group of ours: officially a stage freezes the whole embedding and LM head, or trains them.
STAGES = {
    # I, alignment: the LLM frozen, with its embedding and LM head, in two halves trained apart.
    # Creation: the dream queries and the condition projector, on pairs laid out caption then dream
    # slot, by the diffusion loss alone (such a pair has no LM label).
    "I-creation": dict(groups=["dream_queries", "condition_projector"], lm_weight=0.0,
                       diffusion_weight=1.0, lr=2e-3, mix=["t2i"]),
    # Comprehension: the visual projector, on pairs and chats laid out image then text, by the LM
    # loss: LAION's three sets 3 x 20M, pairs read; LLaVA's pretraining pairs 558K and GQA's
    # questions 13.5M, chats (configs/stage1/vicuna11_7b_llavapretran_comprehension_only.py:27-32)
    "I-comprehension": dict(groups=["visual_projector"], lm_weight=1.0, diffusion_weight=0.0,
                            lr=2e-3, mix={"i2t": 81, "vqa": 19}),
    # II, I-GPT: all but CLIP and SD, on interleaved documents (MMC4 core, 7M) and pairs
    # (BLIP-LAION's 10M, each at random written or read) (configs/stage2/base.py:68-74).
    "II": dict(groups=["dream_queries", "condition_projector", "visual_projector", "llm"],
               lm_weight=1.0, diffusion_weight=10.0, lr=2e-5, mix={"document": 7, "t2i": 5, "i2t": 5}),
    # III, supervised fine-tuning (configs/sft/base.py:70-76): LLaVA-1.5's instructions 665,298
    # (questions), BLIP-LAION's pairs 600K written or read, and MMC4's instructed documents 20,231
    # ("mmc4_instruct_filtered224"): 51.75% / 23.34% / 23.34% / 1.57%.
    "III": dict(groups=["dream_queries", "condition_projector", "visual_projector", "llm"],
                lm_weight=1.0, diffusion_weight=10.0, lr=4e-5,
                mix={"vqa": 33, "t2i": 15, "i2t": 15, "instruct": 1}),
}


def cycle(mix):
    # a mix -> the kinds an epoch of examples cycles through: a list as it is; {kind: weight} as
    # len(weights) kinds spread evenly (smooth weighted round robin: {"a": 2, "b": 1} -> a b a)
    if isinstance(mix, list):
        return mix
    total, credit, kinds = sum(mix.values()), dict.fromkeys(mix, 0), []
    for _ in range(total):
        for kind, weight in mix.items():
            credit[kind] += weight
        kinds.append(max(credit, key=credit.get))
        credit[kinds[-1]] -= total
    return kinds
# The rest of the official recipe (its configs and HF's TrainingArguments defaults): AdamW with
# betas 0.9 / 0.999 and no weight decay, gradients clipped at 1.0, a cosine schedule to 0 after a
# linear warmup over 0.3% of the steps, and the image the diffusion loss is taken on mirrored at
# random (RandomHorizontalFlip; CLIP's copy is not).
OFFICIAL = dict(betas=(0.9, 0.999), warmup_ratio=0.003, final_lr=0.0, random_flip=True, whiten=False)
# A preset's recipe: the official one with named deviations, each measured on the main job
# (held-out colour / shape, 64 images per prompt; docs/recipe.md). The four held-out prompts chose
# them, before data.VALIDATION existed; choices from 2026-12-04 on are made on it.
RECIPES = {
    "toy": dict(
        random_flip=False,  # 26% of the captions say "on the left": a mirror makes them false
        # condition dropout, with the null the sampler uses (the queries after an empty prompt):
        # without, 0.47 / 0.88 (16 images); with the official null 0.38 / 0.89; with this 0.73 / 0.84
        # and GILL's alignment beside the score (plumbing/alignment.py: the condition, through the
        # mapper, regressed onto E(caption) too): drawn from the score alone, a held-out pair's
        # condition lands beside one training pair's, its colour's or its shape's, as the run
        # happens to fall; E(caption) spells colour and shape apart. Chosen on VALIDATION (seeds
        # 0-2, after III): held-out drawing 0.72 / 0.97 / 0.97 -> 0.97 / 1.00 / 0.97, VQA as it was
        # (docs/log.md, 2026-12-05, fifth session)
        dream=dict(cond_dropout=0.1, dropout_null="queries", objective="both", bridge="mapper"),
        betas=(0.9, 0.95), warmup_ratio=1 / 30, final_lr=0.1,  # then 0.79 / 0.94
        # The score on every 2nd step of I-creation, II and III, weighted 2 (train.py --score-every):
        # the same loss in expectation, its costliest term (the UNet, forward and back) sampled;
        # the alignment, the LM loss and the anchor on every step. Chosen on VALIDATION (seed 0,
        # after III): drawing 1.00 -> 0.97, VQA all 0.82 both, for about 90 s; every 4th step of
        # I-creation saved 30 s more and drew 0.84 (docs/log.md, 2026-12-06, fifteenth session)
        # I-creation trains the LLM too (official: frozen), at I-comprehension's lr: the frozen toy
        # LLM's states at the queries hold which colour goes with which shape only in part, and
        # nothing of stage I could teach it to. VALIDATION after III, seeds 0 / 1 / 2: two shapes
        # bound and placed 0.00 (each) -> 0.41 / 0.64 / 0.53, drawing 0.84 / 1.00 / 0.91 -> 1.00 /
        # 0.97 / 1.00, VQA all 0.86 / 0.85 / 0.81 -> 0.89 / 0.88 / 0.88 (docs/log.md, 2026-12-07,
        # twenty-third session). Its projector is not whitened (whitening.py: a frozen LLM's only)
        stages={"I-creation": dict(groups=["dream_queries", "condition_projector", "llm"], lr=3e-4,
                                   diffusion_weight=10.0, score_every=2),  # weight 10: then 0.90 / 0.93
                # the comprehension half first, and with the LLM: the frozen toy LLM never learnt
                # to look (its pretraining saw <image> as one uninformative token), and where II
                # and III train it, the anchor's gradient drowns the LM loss's (docs/log.md, 2026-11-29: reading).
                # Reading first, then the drawing aligned to the LLM that reads: VQA 0.32 -> 0.68
                # after III, drawing 0.73 -> 0.72 (one run of each curriculum; docs/log.md, 2026-11-29: reading)
                # and half its examples questions (official: 18%): the benchmark's reading is VQA
                "I-comprehension": dict(groups=["visual_projector", "llm"], lr=3e-4, mix=["i2t", "vqa"]),
                # The toy's II and III cycle its kinds in equal shares, not the official sizes'
                # proportions (41% documents in II; 52% questions, 1.6% instructed documents in III).
                # II and III train the LLM on reading and writing, and any change of it moves the
                # dream queries' states: the drawing unravels (held-out both 0.88 -> 0.05 after 300
                # steps at lr 1e-4, when I-creation froze the LLM). The anchor, an MSE of each pair's
                # condition to the one the stage began with, holds it (the curriculum: 0.78 after
                # I, 0.69 after II, 0.73 after III; docs/log.md, 2026-11-29: the anchor) while the LLM learns; lr 1e-4 (official
                # 2e-5 and 4e-5): the toy has 600 and 400 steps, not an epoch of MMC4 and LLaVA
                # Openings too: pairs written as a document opens ("Here is a red circle. <image>"),
                # which the anchor holds to their bare caption's condition (data.unframe): stage I
                # aligned only bare captions, and after "Here is ..." the queries' states are not
                # theirs. Documents' pictures after III 0.17 / 0.04 / 0.21 / 0.29 -> 0.58 / 0.71 /
                # 0.88 / 0.75 (seeds 0-3, one thread; docs/log.md, 2026-11-29: documents); drawing, VQA as they were.
                # The alignment too regresses an opening onto E(its bare caption) (train.py), not
                # E("Here is ..."), which the toy SD draws held-out pairs from 50 times in 64, not 64:
                # VALIDATION after III, seeds 0-2, the picture asked for 0.79 / 0.75 / 0.79 -> 1.00 /
                # 1.00 / 0.92 (docs/log.md, 2026-12-07, eighteenth session)
                "II": dict(lr=1e-4, anchor_weight=10.0, score_every=2,
                           mix=["document", "t2i", "i2t", "opening"]),
                # SFT on the shapes world's instructions too: "Draw a red circle.", "Write about
                # two shapes, with pictures." (data.instruction_example), beside its questions
                # and the score on every 2nd step here too: VALIDATION after III, seeds 0-2, drawing
                # 0.97 / 0.94 / 1.00 -> 1.00 / 0.97 / 1.00, VQA all 0.82 / 0.85 / 0.84 -> 0.81 / 0.85 /
                # 0.84; III 3.7 -> 4.7 steps/s, runs interleaved (docs/log.md, 2026-12-07, sixteenth session)
                "III": dict(lr=1e-4, anchor_weight=10.0, score_every=2,
                            mix=["vqa", "instruct", "vqa", "t2i", "i2t", "opening"])},
    ),
}


def recipe(preset):  # the official recipe with the preset's deviations
    return OFFICIAL | dict(dream={}, stages={}) | RECIPES.get(preset, {})


def stage_of(args):  # the stage as the preset's recipe has it: STAGES with its deviations
    return STAGES[args.stage] | recipe(args.preset)["stages"].get(args.stage, {})


# The curriculum `python train.py` runs (--stage all): the stages in order (the toy's reads first:
# RECIPES), each starting from what the last trained (--init), each a run folder of its own under
# --out (default out/<preset>/, e.g. out/toy/II/).
# A stage already done is skipped; one interrupted is continued with --resume.
CURRICULA = {
    # I-comprehension 1500 steps, not 600, chosen on VALIDATION (seed 0, after III): VQA 0.69 ->
    # 0.82, documents' statements true 0.12 -> 0.67, for about a minute (docs/log.md, 2026-12-05, third session)
    "toy": [("I-comprehension", 1500), ("I-creation", 2000), ("II", 600), ("III", 400)],
    "tiny": [("I-creation", 2), ("I-comprehension", 2), ("II", 2), ("III", 2)],  # for the tests
}
