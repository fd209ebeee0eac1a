"""Gender-bias audit of CLIP zero-shot predictions, per modality group of dictionary latents.

``run_audit(AuditConfig(...))`` mirrors the command ``mmono bias-audit``.
"""

from apps.bias_audit.audit import AuditConfig, AuditResult, run_audit
from apps.bias_audit.inputs import AuditTable, read_audit_table
from apps.bias_audit.latents import caption_association, image_association, standardized_difference
from apps.bias_audit.metrics import GroupMetrics, bootstrap_replicates, compute_group_metrics
from apps.bias_audit.tasks import PromptSet, load_prompt_set

__all__ = [
    "AuditConfig",
    "AuditResult",
    "AuditTable",
    "GroupMetrics",
    "PromptSet",
    "bootstrap_replicates",
    "caption_association",
    "compute_group_metrics",
    "image_association",
    "load_prompt_set",
    "read_audit_table",
    "run_audit",
    "standardized_difference",
]
