"""MGCA's three losses (Wang et al., NeurIPS 2022), vectorised over the batch.

Shapes: B samples on this rank, D embedding width (128), Na/Nb local features (patches, words),
K prototypes. Every function takes `valid` [B] bool: a sample without report text takes no part
in a loss (it is neither an anchor nor a negative, and it is not counted in the mean). All maths
is fp32 whatever the inputs' dtype.

- `instance_loss`: image-report InfoNCE, both directions, summed (MGCA's `loss_ita`).
- `local_loss`: one cross-modal token alignment (word->patch or patch->word): each local feature
  attends over the other modality's, then is contrasted against the attended outputs of the
  other positions of the same sample, both ways, weighted per position.
- `clipped_weights`: the per-position weights MGCA derives from the last layer's [CLS] attention,
  clipped to their 10th..90th percentile among the present positions and normalised to sum 1.
- `sinkhorn` + `prototype_loss`: swapped prediction of Sinkhorn-Knopp prototype assignments,
  the assignments balanced over the samples of all ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG = torch.finfo(torch.float32).min


def _valid_count(valid: torch.Tensor) -> torch.Tensor:
    """Number of valid samples as an fp32 scalar, at least 1 (so an all-invalid batch gives loss 0)."""
    return valid.sum().float().clamp_min(1.0)


def instance_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float,
    img_all: torch.Tensor | None = None,
    txt_all: torch.Tensor | None = None,
    valid_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """InfoNCE image->report plus report->image (not averaged, as published).

    img, txt [B, D] L2-normalised; valid [B] bool. With negatives gathered from all ranks pass
    img_all/txt_all [W*B, D], valid_all [W*B] and `offset` = this rank's first row in them.
    """
    img, txt = img.float(), txt.float()
    img_all = img if img_all is None else img_all.float()
    txt_all = txt if txt_all is None else txt_all.float()
    valid_all = valid if valid_all is None else valid_all
    target = torch.arange(img.shape[0], device=img.device) + offset
    n = _valid_count(valid)
    loss = img.new_zeros(())
    for anchor, others in ((img, txt_all), (txt, img_all)):
        logits = (anchor @ others.t()) / temperature  # [B, W*B]
        logits = logits.masked_fill(~valid_all[None, :], _NEG)
        ce = F.cross_entropy(logits, target, reduction="none")
        loss = loss + (ce * valid).sum() / n
    return loss


def clipped_weights(
    attn: torch.Tensor, present: torch.Tensor, *, low: float = 0.1, high: float = 0.9
) -> torch.Tensor:
    """attn [B, N] >= 0, present [B, N] bool -> weights [B, N] fp32: attn clipped per row to its
    `low`..`high` quantiles (linear interpolation, over the present positions only), normalised
    to sum 1; 0 where not present. A row with nothing present is all 0."""
    attn = attn.float()
    masked = attn.masked_fill(~present, float("nan"))
    q = torch.nanquantile(masked, torch.tensor([low, high], device=attn.device), dim=1)  # [2, B]
    lo, hi = q[0].nan_to_num(0.0)[:, None], q[1].nan_to_num(0.0)[:, None]
    w = torch.minimum(torch.maximum(attn, lo), hi) * present
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def local_loss(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_present: torch.Tensor | None,
    weights: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float,
    normalize_context: bool,
) -> torch.Tensor:
    """One direction of MGCA's token-level alignment.

    query [B, Na, D] and keys [B, Nb, D] L2-normalised; key_present [B, Nb] bool (None = all
    present); weights [B, Na] per query position (0 for absent ones). Each query position attends
    over the present keys (softmax(q.k / T)), giving a context [B, Na, D] (L2-normalised when
    `normalize_context`); s = q . context^T / T [B, Na, Na]; cross-entropy with the diagonal as
    target along rows and along columns, weighted by `weights`, summed per sample, mean over the
    valid samples; the two directions averaged.
    """
    query, keys = query.float(), keys.float()
    scores = query @ keys.transpose(1, 2) / temperature  # [B, Na, Nb]
    if key_present is not None:
        # finfo.min rather than -inf: a sample with no key at all gets a finite (unused) context
        scores = scores.masked_fill(~key_present[:, None, :], _NEG)
    context = scores.softmax(dim=-1) @ keys  # [B, Na, D]
    if normalize_context:
        context = F.normalize(context, dim=-1)
    sim = query @ context.transpose(1, 2) / temperature  # [B, Na, Na]
    b, na = sim.shape[:2]
    target = torch.arange(na, device=sim.device).repeat(b)
    w = (weights.float() * valid[:, None]).reshape(-1)
    rows = F.cross_entropy(sim.reshape(b * na, na), target, reduction="none")
    cols = F.cross_entropy(sim.transpose(1, 2).reshape(b * na, na), target, reduction="none")
    n = _valid_count(valid)
    return ((rows * w).sum() / n + (cols * w).sum() / n) / 2


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    valid: torch.Tensor,
    *,
    epsilon: float,
    iterations: int,
    distributed: bool = False,
) -> torch.Tensor:
    """Sinkhorn-Knopp assignments of B samples to K prototypes (SwAV / MGCA).

    scores [B, K] (prototype similarities of this rank's samples), valid [B] bool -> codes
    [B, K] fp32, each valid row summing to 1, invalid rows 0. Q = exp(scores / epsilon) is
    normalised alternately so that every prototype gets an equal share of the total mass and
    every valid sample an equal share; with `distributed` the prototype marginals and the totals
    are all-reduced over the default process group, so the result equals Sinkhorn on the
    concatenation of all ranks' samples.
    """
    import torch.distributed as dist

    reduce = distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        if reduce:
            dist.all_reduce(t)
        return t

    q = torch.exp(scores.float() / epsilon).t() * valid[None, :]  # [K, B]
    k = q.shape[0]
    total = all_sum(q.sum())
    q = q / total
    n_valid = all_sum(valid.sum().float()).clamp_min(1.0)
    tiny = torch.finfo(torch.float32).tiny
    col_target = valid.float() / n_valid  # each valid sample's share
    for _ in range(iterations):
        row = all_sum(q.sum(dim=1))
        q = q * ((1.0 / k) / row.clamp_min(tiny))[:, None]
        q = q * (col_target / q.sum(dim=0).clamp_min(tiny))[None, :]
    return (q / q.sum(dim=0, keepdim=True).clamp_min(tiny)).t()


def prototype_loss(
    img_scores: torch.Tensor,
    txt_scores: torch.Tensor,
    img_codes: torch.Tensor,
    txt_codes: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """Swapped prediction: the image's codes are the target of the report's prototype softmax and
    vice versa; cross-entropies averaged over valid samples, the two directions averaged.
    scores [B, K] (prototype similarities), codes [B, K] (from `sinkhorn`)."""
    n = _valid_count(valid)
    i2t = -(img_codes * F.log_softmax(txt_scores.float() / temperature, dim=1)).sum(dim=1)
    t2i = -(txt_codes * F.log_softmax(img_scores.float() / temperature, dim=1)).sum(dim=1)
    return ((i2t * valid).sum() / n + (t2i * valid).sum() / n) / 2
