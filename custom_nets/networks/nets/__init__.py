from custom_nets.networks.nets.adaptive_cenet import AdaptiveCENet
from custom_nets.networks.nets.cenet import CENet
from custom_nets.networks.nets.resnet_unet import ResNetUNet
from custom_nets.networks.nets.shallow_segnet import ShallowSegNet

__all__ = ["AdaptiveCENet", "CENet", "ResNetUNet", "ShallowSegNet"]
