"""SMTC's training losses (spec §2; paper Eqs. 8-13).

    total = w_sem * L_sem + w_reg * L_reg + L_obj          (spec §2: both weights 1 in every official script)

Shapes: B clips, T frames, S semantic slots, P instance slots, n = h*w tokens, D feature dim.
"""
import itertools

import torch
import torch.nn.functional as F

from smtc_fast.ops import correlation, sinkhorn, transport_loss


# ---------------------------------------------------------------------------------------------------------------- L_sem
def transport_plans(teacher_keys, pairs, eps=0.05, iters=3, marginals="norm", cost="one_minus_cos"):
    """Sinkhorn plans between the teacher keys of frame pairs (spec §2.1), without gradient.

    teacher_keys (B, T, n, D); pairs: list of (i, j). Returns plans (B, len(pairs), n, n): plan[.., a, b] couples
    token a of frame i with token b of frame j.
        marginals "norm"    official: mu[a] = ||f_hat_i[a]||_1 (L1 norm of the L2-normalised key), renormalised
                  "uniform" paper Eq. 8: 1/n
        cost "one_minus_cos" official: 1 - cos;  "neg_cos" paper Eq. 8: -cos (the same plan up to a constant shift
                            only once converged, so kept as an option)
    The official code iterates in the probability domain starting from b = 1 (sinkhorn_cluster); our op is the
    same iteration in the log domain (smtc_fast.ops.sinkhorn docstring), so the plan is the same.
    """
    B, T, n, D = teacher_keys.shape
    with torch.no_grad():
        f = F.normalize(teacher_keys.float(), dim=-1)
        I = torch.tensor([i for i, _ in pairs], device=f.device)
        J = torch.tensor([j for _, j in pairs], device=f.device)
        fi, fj = f[:, I].flatten(0, 1), f[:, J].flatten(0, 1)  # (B*Np, n, D)
        cos = correlation(fi.contiguous(), fj.contiguous())  # (B*Np, n, n)
        if cost == "one_minus_cos":
            C = 1.0 - cos
        elif cost == "neg_cos":
            C = -cos
        else:
            raise ValueError(f"cost must be 'one_minus_cos' or 'neg_cos', got {cost!r}")
        if marginals == "norm":
            log_mu = fi.abs().sum(-1).log()
            log_nu = fj.abs().sum(-1).log()
            log_mu = log_mu - log_mu.logsumexp(-1, keepdim=True)  # renormalised to sum 1, as inside sinkhorn_cluster
            log_nu = log_nu - log_nu.logsumexp(-1, keepdim=True)
        elif marginals == "uniform":
            log_mu = log_nu = None
        else:
            raise ValueError(f"marginals must be 'norm' or 'uniform', got {marginals!r}")
        plan = sinkhorn(C, log_mu, log_nu, eps=eps, iters=iters)
    return plan.reshape(B, len(pairs), n, n)


def semantic_loss(student_logits, teacher_logits, teacher_keys, eps=0.05, iters=3, marginals="norm",
                  cost="one_minus_cos"):
    """L_sem (spec §2.1, paper Eq. 9): transport-weighted cross-entropy over all ordered frame pairs i != j.

    student_logits, teacher_logits (B, T, S, n); teacher_keys (B, T, n, D) (the teacher's un-fused keys on both
    sides of the cost). The teacher's soft mask at token b of frame j is the target for the student's mask at the
    token a of frame i it is transported to:
        L = mean_{B x pairs} sum_{a,b} -plan[a,b] * sum_s p_t_j[s,b] * log(p_s_i[s,a] + 1e-8)
    with the plans of `transport_plans` (marginals, cost, eps, iters as there). Gradient flows only into
    student_logits. Uniform masks give log S (the plan sums to 1).

    Computed by the fused op smtc_fast.ops.transport_loss, which never materialises the (B*T*(T-1), n, n) costs,
    plans or cross matrices (its reference is the unfused path). Inputs are computed in float32 (float64 if any
    input is float64), as the official code does in fp32. bf16 keys (a bf16 forward's, under --amp) are passed
    as they are: the op computes on their exact float32 values, and its CPU kernel multiplies them on AMX.
    """
    # shapes, T >= 2, eps, iters, marginals and cost are validated by transport_loss (ops/transport_loss.py)
    dtype = torch.float32
    for x in (student_logits, teacher_logits, teacher_keys):
        dtype = torch.promote_types(dtype, x.dtype)
    keys = teacher_keys.detach()
    if not (keys.dtype == torch.bfloat16 and dtype == torch.float32):
        keys = keys.to(dtype)
    return transport_loss(student_logits.to(dtype), teacher_logits.detach().to(dtype), keys, eps, iters, marginals,
                          cost)


# ---------------------------------------------------------------------------------------------------------------- L_reg
def overlap_loss(logits):
    """L_reg (spec §2.2): mean cosine between the soft masks of different semantic slots.

    logits (B, T, S, n). p = softmax_S + 1e-8, L2-normalised over tokens; mean over (b, t, s != s') of <p_s, p_s'>.
    Uniform masks give 1; disjoint one-hot masks give ~0.
    """
    B, T, S, n = logits.shape
    if S < 2:
        raise ValueError(f"L_reg needs at least 2 semantic slots, got S={S}")
    p = F.normalize(logits.float().softmax(dim=2) + 1e-8, dim=-1)
    d = torch.einsum("btsn,btrn->btsr", p, p)
    off = ~torch.eye(S, dtype=torch.bool, device=logits.device)
    return d[:, :, off].mean()


# ---------------------------------------------------------------------------------------------------------------- L_obj
@torch.no_grad()
def valid_instances(semantic_logits, semantic_slots, instance_slots, pixel_thresh=0.3, area_thresh=0.2,
                    sim_thresh=0.5):
    """Validity filter (spec §2.4, paper Eq. 11) -> float (B, T, S, P) in {0, 1}.

    valid[s, p] = cos(semantic slot s, instance slot (s, p)) > sim_thresh  and  area_s > area_thresh, with
    area_s = mean over tokens of [softmax_S(logits)[s] > pixel_thresh]. Raw (unprojected) slots; no gradient.
    """
    area = (semantic_logits.float().softmax(dim=2) > pixel_thresh).float().mean(dim=-1)  # (B, T, S)
    cos = (F.normalize(semantic_slots.float(), dim=-1)[..., None, :]
           * F.normalize(instance_slots.float(), dim=-1)).sum(-1)  # (B, T, S, P)
    return ((cos > sim_thresh) & (area > area_thresh)[..., None]).float()


_PERMS = {}


def _permutations(P, device):
    key = (P, str(device))
    if key not in _PERMS:
        _PERMS[key] = torch.tensor(list(itertools.permutations(range(P))), dtype=torch.long, device=device)
    return _PERMS[key]


def match_instances(cost):
    """One-to-one assignment minimising the total cost, for a batch of small square problems.

    cost (..., P, P) with P <= 6 -> match (..., P) long: row p is assigned column match[p]. Brute force over all P!
    permutations, vectorised over the batch on cost's device: the same optimum as
    scipy.optimize.linear_sum_assignment (which the official code calls B*S*T^2 times per step on the CPU).
    """
    P = cost.shape[-1]
    if cost.shape[-2] != P:
        raise ValueError(f"cost must be square (..., P, P), got {tuple(cost.shape)}")
    if not 1 <= P <= 6:
        raise ValueError(f"match_instances enumerates all P! permutations; P must be in 1..6, got {P}")
    perms = _permutations(P, cost.device)  # (P!, P)
    rows = torch.arange(P, device=cost.device)
    totals = cost[..., rows, perms].sum(-1)  # (..., P!): cost[..., p, perm[k, p]] summed over p
    return perms[totals.argmin(dim=-1)]


def object_loss(z_s, z_t, v_s, v_t, margin=0.5, variant="cos"):
    """L_obj (spec §2.3; paper Eqs. 10-13): instance contrast between student and teacher across all T x T pairs.

    z_s, z_t (B, T, S, P, D) unit-norm projections (student, teacher); v_s, v_t (B, T, S, P) validity.
    For student frame i and teacher frame j (i = j included), instances of the same semantic slot are matched
    one-to-one on 1 - cos; the matched teacher instance is the positive, the other P-1 are negatives.
        variant "cos" (official): v_s * ( mean_{q != m} relu(cos_q - margin) - v_t[m] * cos_m )
        variant "l2"  (paper Eq. 12): v_s * ( v_t[m] * ||z - z_t_m|| + sum_{q != m} relu(margin - ||z - z_t_q||) )
    Reduced as sum / (sum of v_s + 1e-10 per element) over all pairs; exactly 0 when nothing is valid.
    """
    B, T, S, P, D = z_s.shape
    if z_t.shape != z_s.shape:
        raise ValueError(f"z_t {tuple(z_t.shape)} must match z_s {tuple(z_s.shape)}")
    if v_s.shape != (B, T, S, P) or v_t.shape != (B, T, S, P):
        raise ValueError(f"v_s and v_t must be (B, T, S, P) = {(B, T, S, P)}, got {tuple(v_s.shape)}, "
                         f"{tuple(v_t.shape)}")
    if variant not in ("cos", "l2"):
        raise ValueError(f"variant must be 'cos' or 'l2', got {variant!r}")
    z_t = z_t.detach().float()
    sim = torch.einsum("bispd,bjsqd->bijspq", z_s.float(), z_t)  # (B, Ti, Tj, S, P, Q)
    with torch.no_grad():
        match = match_instances(1.0 - sim.detach())  # (B, Ti, Tj, S, P)
        if P > 1:
            neg_mask = torch.ones_like(sim, dtype=torch.bool).scatter_(-1, match[..., None], False)
        vt_match = torch.gather(v_t[:, None].expand(B, T, T, S, P), -1, match)  # (B, Ti, Tj, S, P)
    vs = v_s[:, :, None].expand(B, T, T, S, P).float()
    if variant == "cos":
        pos = torch.gather(sim, -1, match[..., None])[..., 0]
        neg = (F.relu(sim - margin) * neg_mask).sum(-1) / (P - 1) if P > 1 else torch.zeros_like(pos)
        per = neg - vt_match * pos
    else:
        dist = (2.0 - 2.0 * sim).clamp_min(1e-12).sqrt()  # ||z - z_t|| for unit vectors
        pos = torch.gather(dist, -1, match[..., None])[..., 0]
        neg = (F.relu(margin - dist) * neg_mask).sum(-1) if P > 1 else torch.zeros_like(pos)
        per = vt_match * pos + neg
    return (vs * per).sum() / (vs + 1e-10).sum()


def smtc_losses(student, teacher, w_sem=1.0, w_reg=1.0, sinkhorn_eps=0.05, sinkhorn_iters=3, marginals="norm",
                cost="one_minus_cos", obj_margin=0.5, obj_variant="cos", pixel_thresh=0.3, area_thresh=0.2,
                sim_thresh=0.5):
    """All losses from the student's and the teacher's SMTCOutput -> dict(total, sem, reg, obj, valid_frac)."""
    l_sem = semantic_loss(student.semantic_logits, teacher.semantic_logits, teacher.keys, sinkhorn_eps,
                          sinkhorn_iters, marginals, cost)
    l_reg = overlap_loss(student.semantic_logits)
    v_s = valid_instances(student.semantic_logits, student.semantic_slots, student.instance_slots, pixel_thresh,
                          area_thresh, sim_thresh)
    v_t = valid_instances(teacher.semantic_logits, teacher.semantic_slots, teacher.instance_slots, pixel_thresh,
                          area_thresh, sim_thresh)
    l_obj = object_loss(student.proj, teacher.proj, v_s, v_t, obj_margin, obj_variant)
    total = w_sem * l_sem + w_reg * l_reg + l_obj
    return {"total": total, "sem": l_sem, "reg": l_reg, "obj": l_obj, "valid_frac": v_s.mean()}


# ---------------------------------------------------------------------------------------------------------- the step
def step_losses(student, teacher, x_s, x_t, noise_s, noise_t, amp_dtype=None, sinkhorn_eps=0.05, sinkhorn_iters=3,
                marginals="norm", cost="one_minus_cos", obj_margin=0.5, obj_variant="cos"):
    """The forward half of a training step (smtc_fast.train): both models on their views, then the losses.

    x_s, x_t (B, T, 3, H, W) the student's and the teacher's augmented views; noise_s, noise_t their instance-slot
    noise. amp_dtype: torch.bfloat16 runs the two forwards under autocast (the losses stay in float32), None = fp32.
    Returns (L_sem, L_reg, obj_sum, v_s): obj_sum = L_obj x (its denominator), so that the trainer can reduce the
    denominator (the number of valid student instances) over DDP ranks before dividing.
    One plain function with no host synchronisation, so `torch.compile(step_losses, fullgraph=True)` captures it
    as one graph (trainer --compile; python_tests/test_model_train.py checks the capture against eager).
    """
    with torch.autocast(x_s.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out_s = student(x_s, noise_s)
        with torch.no_grad():
            out_t = teacher(x_t, noise_t)
    l_sem = semantic_loss(out_s.semantic_logits, out_t.semantic_logits, out_t.keys, sinkhorn_eps, sinkhorn_iters,
                          marginals, cost)
    l_reg = overlap_loss(out_s.semantic_logits)
    v_s = valid_instances(out_s.semantic_logits, out_s.semantic_slots, out_s.instance_slots)
    v_t = valid_instances(out_t.semantic_logits, out_t.semantic_slots, out_t.instance_slots)
    obj_sum = object_loss(out_s.proj, out_t.proj, v_s, v_t, obj_margin, obj_variant) * (v_s.float() + 1e-10).sum()
    return l_sem, l_reg, obj_sum, v_s
