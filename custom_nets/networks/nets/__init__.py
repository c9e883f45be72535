from custom_nets.networks.nets.adaptive_cenet import AdaptiveCENet

__all__ = ["AdaptiveCENet"]
