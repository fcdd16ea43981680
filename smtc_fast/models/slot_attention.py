"""Semantic-aware masked slot attention: SMTC's two-stage slot decomposition (spec §1.3, paper Eqs. 5-7).

Stage 1 decomposes every frame's fused features into S semantic slots; stage 2 splits each semantic slot into P
instance slots, each group attending only to its semantic slot's mask. Both stages share the LayerNorms, the
q/k/v projections and the MLP, and k, v are computed once. The attention + weighted mean of each step is the
public op `smtc_fast.ops.slot_aggregate`.
"""
import torch
import torch.nn as nn

from smtc_fast.ops import slot_aggregate
from smtc_fast.ops.slot_aggregate import slot_values

STAGE2_MASKS = ("logits", "prob", "soft")
SLOT_UPDATES = ("residual", "gru")
SIGMA_GRADS = ("zero", "none")


class _NonReparameterisedNormal(torch.autograd.Function):
    """init = mu + exp(log_sigma) * noise with torch.normal's derivative: zero for both mu and log_sigma.

    The official stage-2 init is `torch.normal(mu, exp(log_sigma))` (spec §1.3), which autograd differentiates as
    zero. So after a backward that reaches the instance slots, `slots_sigma.grad` is a zero *tensor*, not None, and
    AdamW's decoupled weight decay still shrinks log sigma every step (p -= lr * wd * p; spec §1.5-1.6)."""

    @staticmethod
    def forward(mu, log_sigma, noise):
        return mu + log_sigma.exp() * noise

    @staticmethod
    def setup_context(ctx, inputs, output):
        mu, log_sigma, _ = inputs
        ctx.mu_meta, ctx.sigma_meta = (mu.shape, mu.dtype), (log_sigma.shape, log_sigma.dtype)

    @staticmethod
    def backward(ctx, grad):
        (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = ctx.mu_meta, ctx.sigma_meta
        return grad.new_zeros(mu_shape, dtype=mu_dtype), grad.new_zeros(sigma_shape, dtype=sigma_dtype), None


class SlotAttention(nn.Module):
    """Two-stage masked slot attention. Parameter names follow the official checkpoint (spec §6).

    stage2_mask: how stage 1 gates stage 2 (spec §1.3 / §5.1.4)
        "logits"  official default: M = (stage-1 logits q.k/sqrt(D) > tau), tau 0.3
        "prob"    paper Eq. 7: M = (softmax_S(stage-1 logits) > tau), tau 0.5
        "soft"    first release (spec §2.5): M = softmax_S(stage-1 logits), no threshold
    slot_update: "residual" (official: s + attn.v, then + MLP) or "gru" (paper Eq. 6: GRU(updates, s), then + MLP)
    sigma_grad: what the non-reparameterised stage-2 sample gives slots_sigma (and slots_mu) in backward
        "zero"    official: a zero gradient tensor, so AdamW's decoupled weight decay shrinks log sigma every step
                  (about -1.1 % of log sigma over the 10k-step recipe at lr 2e-5, wd 0.1)
        "none"    no gradient (the sample is built under no_grad): the optimiser skips slots_sigma and it stays
                  exactly at its initialisation, which is what "sigma is never trained" (spec §1.5) intends
    """

    def __init__(self, num_slots=16, num_instances=4, dim=384, iters=3, eps=1e-8, stage2_mask="logits", tau=0.3,
                 slot_update="residual", sigma_grad="zero"):
        super().__init__()
        if stage2_mask not in STAGE2_MASKS:
            raise ValueError(f"stage2_mask must be one of {STAGE2_MASKS}, got {stage2_mask!r}")
        if slot_update not in SLOT_UPDATES:
            raise ValueError(f"slot_update must be one of {SLOT_UPDATES}, got {slot_update!r}")
        if sigma_grad not in SIGMA_GRADS:
            raise ValueError(f"sigma_grad must be one of {SIGMA_GRADS}, got {sigma_grad!r}")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        self.num_slots, self.num_instances, self.dim, self.iters, self.eps = num_slots, num_instances, dim, iters, eps
        self.stage2_mask, self.tau, self.slot_update = stage2_mask, tau, slot_update
        self.sigma_grad = sigma_grad
        self.scale = dim ** -0.5

        # Gaussian per semantic slot (spec §1.3): mu ~ N(0, 1); slots_sigma holds log(sigma), xavier-uniform init
        # (so sigma ~ 0.97-1.03). Sampling is not reparameterised, hence sigma gets no signal from the losses
        # (spec §1.5); with sigma_grad="zero" (official) weight decay still moves it.
        self.slots_mu = nn.Parameter(torch.randn(1, num_slots, 1, dim))
        self.slots_sigma = nn.Parameter(torch.zeros(1, num_slots, 1, dim))
        nn.init.xavier_uniform_(self.slots_sigma)

        self.norm_input = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_pre_ff = nn.LayerNorm(dim)
        self.project_q = nn.Linear(dim, dim)
        self.project_k = nn.Linear(dim, dim)
        self.project_v = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        if slot_update == "gru":
            self.gru = nn.GRUCell(dim, dim)

    def _update(self, slots_prev, logits, v, mask=None):
        """One slot update from the step's logits: s + attn.v (official) or GRU(attn.v, s), then + MLP."""
        if self.slot_update == "gru":
            updates, _ = slot_aggregate(logits, v, mask=mask, eps=self.eps)
            shape = slots_prev.shape
            slots = self.gru(updates.reshape(-1, self.dim), slots_prev.reshape(-1, self.dim)).reshape(shape)
        else:  # s + attn.v in the op's one pass (its residual), the same float addition
            slots, _ = slot_aggregate(logits, v, mask=mask, eps=self.eps, residual=slots_prev)
        # under autocast the MLP's output is bf16: cast up explicitly, as torch's mixed bf16 + float32 add is
        # twice as slow here as the cast and a float32 add (the same values)
        return slots + self.mlp(self.norm_pre_ff(slots)).to(slots.dtype)

    def _dots(self, q, k):
        """q.k^T * scale (B, M, N) for queries q (B, M, D) and keys k (B, N, D), formed as (k q^T)^T: the same dot
        products, but autograd then gives k its gradient in k's own layout. Formed as q k^T (the einsum), k's
        gradient came transposed, and each step paid a strided add and a transposing copy of it (B, N, D)."""
        return (torch.bmm(k, q.transpose(1, 2)) * self.scale).transpose(1, 2).contiguous()

    def semantic_mask(self, logits):
        """Stage-2 gate (B, S, N) from the stage-1 logits (B, S, N); never differentiated."""
        logits = logits.detach()
        if self.stage2_mask == "logits":
            return (logits > self.tau).to(logits.dtype)
        prob = logits.float().softmax(dim=1).to(logits.dtype)
        return (prob > self.tau).to(logits.dtype) if self.stage2_mask == "prob" else prob

    def forward(self, inputs, instance_noise=None):
        """inputs (B, N, D) -> dict of
            semantic_slots (B, S, D), semantic_logits (B, S, N)          last stage-1 iteration's q.k^T*scale
            instance_slots (B, S, P, D), instance_logits (B, S, P, N)    last stage-2 iteration's logits
        instance_noise (B, S, P, D): the standard-normal draw of the instance-slot initialisation
        (init = mu + exp(log_sigma) * noise); drawn with torch.randn when None.
        """
        B, N, D = inputs.shape
        S, P = self.num_slots, self.num_instances
        if D != self.dim:
            raise ValueError(f"inputs must have feature dim {self.dim}, got shape {tuple(inputs.shape)}")
        # (under autocast a bf16 input gives a bf16 LayerNorm output: autocast runs layer_norm in its input's dtype
        # on the CPU, with float32 statistics, so k and v need no cast of x)
        x = self.norm_input(inputs)
        k = self.project_k(x)  # (B, N, D), shared by both stages
        v = self.project_v(x)
        # Under CPU autocast slot_aggregate computes in float32: v is kept in bf16 where its CPU kernel reads bf16
        # (the same results from half the bytes), else cast up once here rather than in each of the 2 x iters calls
        v = slot_values(v)

        # Stage 1: deterministic init at mu (the same for every frame).
        mu = self.slots_mu.squeeze(2)  # (1, S, D)
        init = mu.expand(B, S, D)
        slots = init
        grad = torch.is_grad_enabled()
        for t in range(self.iters):
            # iterations before the last are cut off by the straight-through below: no graph for them
            with torch.set_grad_enabled(grad and t == self.iters - 1):
                q = self.project_q(self.norm_slots(slots))
                sem_logits = self._dots(q, k)  # (B, S, N)
                slots = self._update(slots, sem_logits, v)
            if t == self.iters - 2:
                # Straight-through fixed point (spec §1.3): only the last iteration is backpropagated; the earlier
                # ones pass an identity gradient to the initialisation.
                slots = slots.detach() - init.detach() + init
        semantic_slots = slots

        # Stage 2: P Gaussian samples per semantic slot, independent per frame. Not reparameterised (spec §1.3:
        # torch.normal), so the init carries no gradient to mu or sigma: a zero one (official) or none at all.
        if instance_noise is None:
            instance_noise = torch.randn(B, S, P, D, device=inputs.device, dtype=inputs.dtype)
        elif tuple(instance_noise.shape) != (B, S, P, D):
            raise ValueError(f"instance_noise must have shape (B*T, S, P, D) = {(B, S, P, D)}, "
                             f"got {tuple(instance_noise.shape)}")
        # in the parameters' dtype: under autocast the official torch.normal(mu, sigma) draw is float32 (rounding
        # the noise to the bf16 of the inputs was a deviation, and two casts of a (B*T, S, P, D) tensor)
        noise = instance_noise.to(self.slots_mu.dtype)
        if self.sigma_grad == "zero":
            init = _NonReparameterisedNormal.apply(self.slots_mu, self.slots_sigma, noise)
        else:
            with torch.no_grad():
                init = (self.slots_mu + self.slots_sigma.exp() * noise).detach()
        mask = self.semantic_mask(sem_logits)  # (B, S, N)
        slots = init
        for t in range(self.iters):
            with torch.set_grad_enabled(grad and t == self.iters - 1):
                q = self.project_q(self.norm_slots(slots))
                ins_logits = self._dots(q.reshape(B, S * P, D), k).view(B, S, P, N)
                slots = self._update(slots, ins_logits, v, mask)
            if t == self.iters - 2:
                slots = slots.detach() - init.detach() + init
        return {"semantic_slots": semantic_slots, "semantic_logits": sem_logits,
                "instance_slots": slots, "instance_logits": ins_logits}
