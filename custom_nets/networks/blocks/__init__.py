from custom_nets.networks.blocks.adaptive_atrous_conv import AdaptiveAtrousConv
from custom_nets.networks.blocks.attention_rmp import AttentionRMP
from custom_nets.networks.blocks.cenet_decoder_block import CENetDecoderBlock
from custom_nets.networks.blocks.dense_atrous_conv import DenseAtrousConv
from custom_nets.networks.blocks.dual_path_decoder import DualPathDecoder
from custom_nets.networks.blocks.feature_aggregation import FeatureAggregation
from custom_nets.networks.blocks.residual_multikernel_pooling import ResidualMultiKernelPooling
from custom_nets.networks.blocks.resnet_encoder import ResNetEncoder

__all__ = [
    "AdaptiveAtrousConv",
    "AttentionRMP",
    "CENetDecoderBlock",
    "DenseAtrousConv",
    "DualPathDecoder",
    "FeatureAggregation",
    "ResidualMultiKernelPooling",
    "ResNetEncoder",
]
