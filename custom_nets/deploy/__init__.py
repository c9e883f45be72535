"""Hand-off of trained bundles: TorchScript-only bundles for MONAI Label / MONAI Deploy, ONNX Runtime checks."""

from custom_nets.deploy.handoff import HandoffError, export_handoff, merged_ts_config

__all__ = ["HandoffError", "export_handoff", "merged_ts_config"]
