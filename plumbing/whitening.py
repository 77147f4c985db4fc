"""A trick of this project, not of the paper: the condition projector trained in whitened
coordinates.
Opt-in (train.py --whiten), in a stage that freezes the LLM. The shapes world's recipe used it
until its I-creation trained the LLM too (recipes.py's RECIPES; docs/log.md, 2026-12-07,
twenty-third session); tools/exercises' `whitening` experiment compares the two.

What: AdamW steps W' and the projector is W = W' Z, with Z = (E[h h^T] + eps)^(-1/2) over the dream
queries' states h after the run's first prompts, measured once at the start, with the LLM frozen.
W stays one linear map, saved as the release's projector is.

Why: a frozen LLM's states at the query positions are nearly parallel (in the toy, across prompts
they share one mean direction of norm 14.8, and the prompt moves them by 2.5), and AdamW, which
scales each entry of W alone, then learns the few directions that name a colour or a shape many
times too slowly. Measured on the shapes world (sample.py --eval, 16 images per prompt; the same
four held-out prompts that chose these settings, so no unseen split; with W = W_init Z, below):
- held-out colour / shape after 1500 steps: 0.73 / 0.95 whitened, 0.08 / 0.27 without;
- EPS, relative to the largest eigenvalue, keeps the directions the states barely use from being
  blown up to unit scale: in the toy they mostly tell the training combinations apart. After 3000
  steps: 0.89 / 1.00 at 1e-6, 0.97 / 1.00 at 1e-5; at 1e-2 nothing is learnt (0.16 / 0.27);
- the dream queries step at a tenth of the lr meanwhile (QUERY_LR): Z was measured for the states of
  the queries at the start, and W's large gain along the directions those states barely use draws
  the queries' gradient there (at the full lr, held-out colour fell from 0.94 to 0.34).
The projector starts where it is, its random init or a trained one (--init): W' = W Z^-1, a change
of coordinates only. Taking a fresh init as W' instead (W = W_init Z) gave the directions the states
barely use large random gains from the first step: held-out both right after 2000 steps of stage
I-creation 0.78 that way, 0.88 this way (one seed each, benchmark.py; one thread for the second).
"""
import torch

from shapes import data


class Whitening:
    N_PROMPTS = 256   # prompts whose dream-query states measure E[h h^T]
    QUERY_LR = 0.1    # the dream queries' lr, relative to the run's
    EPS = 1e-5        # Z's floor, relative to the largest eigenvalue of E[h h^T]

    def __init__(self, model, example, saved=None):
        self.weight = model.condition_projector.weight  # W (C, D)
        self.queries = model.dream_queries
        if saved is None:  # the text before each example's first image: what a dream slot follows
            with torch.no_grad():
                h = torch.cat([model.dream_states(text.split(data.IMAGE_TOKEN)[0])[0].double()
                               for text, *_ in map(example, range(self.N_PROMPTS))])  # (N K, D)
                e, V = torch.linalg.eigh(h.T @ h / len(h))  # float64: e spans 6 orders of magnitude
                Z = V @ torch.diag((e.clamp(min=0) + self.EPS * e.max()).rsqrt()) @ V.T  # (D, D)
                Z = ((Z + Z.T) / 2).float()  # symmetric to the last bit, as dL/dW' assumes
                W = self.weight.detach().float()
            saved = {"Z": Z, "prime": W @ torch.linalg.inv(Z)}
        self.Z = saved["Z"].to(self.weight.device)
        self.prime = torch.nn.Parameter(saved["prime"].to(self.weight.device))  # W': AdamW steps it
        self.update()

    def optimizer_params(self, params):
        # the optimizer's parameters: W' in W's place; and which of them step at lr * QUERY_LR
        params = [self.prime if p is self.weight else p for p in params]
        return params, [p for p in params if p is self.queries]

    def attach(self, optimizer):
        # dL/dW' = dL/dW Z^T (Z is symmetric) after every backward (micro-batches accumulate in W),
        # and W = W' Z after each optimizer step
        self.weight.register_post_accumulate_grad_hook(self._gradient_to_prime)
        optimizer.register_step_post_hook(lambda *_: self.update())

    def state(self):  # saved with the optimizer's: resuming goes on from the same W' and Z
        return {"whitening.Z": self.Z.cpu(), "whitening.prime": self.prime.detach().cpu()}

    def _gradient_to_prime(self, weight):
        self.prime.grad = weight.grad.float() @ self.Z

    @torch.no_grad()
    def update(self):
        self.weight.copy_(self.prime @ self.Z)
        self.weight.grad = None  # not the optimizer's, so not cleared by it
