"""Models: the hybrid GDN LM, the seed's SimpleLMWithGDN, configs and outputs."""
from gdnspec.models.config import GDNConfig
from gdnspec.models.lm import GDNForCausalLM
from gdnspec.models.outputs import CausalLMOutput, TreeVerifyOutput
from gdnspec.models.simple import SimpleLMWithGDN

__all__ = ["CausalLMOutput", "GDNConfig", "GDNForCausalLM", "SimpleLMWithGDN", "TreeVerifyOutput"]
