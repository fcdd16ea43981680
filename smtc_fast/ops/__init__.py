"""The public ops. Each is a registered torch operator (`torch.ops.smtc_fast.<name>`, schemas in
csrc/ops.cpp) with autograd and a fake kernel, and each has a pure-PyTorch `<name>_reference` with the same
signature: the specification, the test oracle, and the fallback wherever no kernel serves (extension not
built, a device or dtype without a kernel, or SMTC_FAST_FORCE_REFERENCE=1).
"""
from smtc_fast.ops.correlation import correlation, correlation_reference
from smtc_fast.ops.sinkhorn import sinkhorn, sinkhorn_reference
from smtc_fast.ops.slot_aggregate import slot_aggregate, slot_aggregate_reference

__all__ = [
    "correlation", "correlation_reference",
    "slot_aggregate", "slot_aggregate_reference",
    "sinkhorn", "sinkhorn_reference",
]
from smtc_fast.ops.propagate_labels import propagate_labels, propagate_labels_reference  # noqa: E402

__all__ += ["propagate_labels", "propagate_labels_reference"]
from smtc_fast.ops.transport_loss import transport_loss, transport_loss_reference  # noqa: E402

__all__ += ["transport_loss", "transport_loss_reference"]
from smtc_fast.ops.jf_counts import jf_counts, jf_counts_reference  # noqa: E402

__all__ += ["jf_counts", "jf_counts_reference"]
