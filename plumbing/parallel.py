"""Many processes for train.py (torchrun): data parallelism by hand, and FSDP for an LLM that trains.

Under torchrun (WORLD_SIZE > 1) every process runs train.py on a slice of each global batch and
weights its losses by its share of the batch's tokens and images, so that the sum of the processes'
gradients is the gradient of the global batch's loss. The gradients of the replicated trained
parameters are summed by hand (sync_grads) rather than by DistributedDataParallel: DDP averages
over processes (right only for equal slices, and ours differ in tokens and images), needs
find_unused_parameters (a slice without images leaves the condition projector unused) and no_sync()
for --grad-accum; one all-reduce per tensor after the last micro-batch is all data parallelism is.
(It does not overlap communication with backward as DDP's buckets do: with only the small DreamLLM
parts replicated, that costs little; the 7B LLM goes to FSDP, which does overlap.)
"""
import atexit
import os

import torch
import torch.distributed as dist


def init_distributed(device):  # -> (rank, world size, this process's device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    return dist.get_rank(), world, device


def batch_shares(batches, world, device, lm_mean="token"):
    # -> (len(batches), 3): each of this process's batches' share of the global micro-batch's
    # labelled tokens (lm_mean "example": of its examples with a label), of its images with a
    # diffusion loss and of its pairs written (what the alignment and the anchor are taken over;
    # every process's counted): weighting each batch's losses by them makes the sum of all the
    # gradients the global batch's
    def labelled(labels):
        has = labels[:, 1:] != -100
        return (has.sum() if lm_mean == "token" else has.any(1).sum()).item()
    counts = torch.tensor([[labelled(b["labels"]), len(b.get("vae_pixels", ())),
                            len(b.get("pairs", ()))]
                           for b in batches], dtype=torch.float64, device=device)
    return (counts / all_sum(counts.sum(0), world).clamp(min=1)).float()


def all_sum(t, world):  # the sum over processes, in place
    if world > 1:
        dist.all_reduce(t)
    return t


def sync_grads(params, world):
    from torch.distributed.tensor import DTensor  # FSDP's sharded parameters: already reduced
    if world == 1:
        return
    replicated = []
    for p in params:
        if isinstance(p, DTensor):  # FSDP averaged the shards' gradients over the processes: we want the sum
            p.grad.mul_(world)
        else:
            if p.grad is None:  # unused here, maybe not elsewhere: every process must join every all-reduce
                p.grad = torch.zeros_like(p)
            replicated.append(p.grad)
    if replicated:  # one all-reduce of them all, flattened: each call costs a round trip
        flat = all_sum(torch.cat([g.reshape(-1) for g in replicated]), world)
        for g, summed in zip(replicated, flat.split([g.numel() for g in replicated])):
            g.copy_(summed.view_as(g))


def shard_llm(model):
    # FSDP2: each LLaMA block, the embedding, the final norm and lm_head become a unit whose parameters
    # (and gradients and AdamW moments) are split across the processes and gathered just before use.
    # Each is its own unit because DreamLLM calls them directly (embed_tokens, lm_head), not llm().
    from torch.distributed.fsdp import fully_shard
    llm = model.llm
    if llm.cfg.tie_embeddings:
        raise ValueError("--fsdp: an LLM with tied embeddings is not supported (its embedding is in two units)")
    units = [*llm.model.layers, llm.model.embed_tokens, llm.model.norm, llm.lm_head]
    for u in units:
        fully_shard(u)
    return units


def clip_grads(params, max_norm, world):
    # clip_grad_norm_ over sharded (DTensor) and replicated gradients: sharded squares are summed over
    # the processes, replicated ones are the same in each
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    zero = torch.zeros((), device=params[0].device)
    sharded = sum((g.to_local().float().pow(2).sum() for g in grads if isinstance(g, DTensor)), zero)
    rest = sum((g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)), zero)
    norm = (all_sum(sharded, world) + rest).sqrt()
    for g in grads:
        g.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0).to(g.dtype))
    return norm
