"""Experts, gates and the MoE module (docs/papers.md A.1, B.2; design choices 1-2)."""

from moe_dist.models.build import build_model
from moe_dist.models.experts import (CifarExpert, CifarExpertBank, ExpertBank, MnistExpert,
                                     MnistExpertBank, PatchExpert, PatchExpertBank)
from moe_dist.models.gates import CifarGate, ExpertAttention, FmnistGate, MnistGate, PatchRouter
from moe_dist.models.moe import MoE, MoEOutput, SingleModel

__all__ = [
    "build_model",
    "ExpertBank", "MnistExpert", "MnistExpertBank", "CifarExpert", "CifarExpertBank",
    "PatchExpert", "PatchExpertBank",
    "MnistGate", "FmnistGate", "CifarGate", "PatchRouter", "ExpertAttention",
    "MoE", "MoEOutput", "SingleModel",
]
