from custom_nets.networks.nets import *  # noqa: F401,F403
from custom_nets.networks.nets import __all__
