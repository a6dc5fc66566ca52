"""Networks: the seed's nets, backbones and heads by name, code rules, the model spec, RetrievalModel."""

from deephash.models.backbones import (
    BACKBONES,
    BasicBlock,
    FMnistCNN,
    ResNetCifar,
    SeedCNN,
    create_backbone,
    list_backbones,
    register_backbone,
    timm_backbone,
)
from deephash.models.heads import HEADS, ClassifierHead, EmbeddingHead, HashHead, IdentityHead, Normalize, sign_codes
from deephash.models.pca_codes import fit_linear_hash, fit_pca_codes, itq_rotation, linear_hash_codes, pca_codes, pca_projection, pca_rows, random_rotation
from deephash.models.posterior_codes import posterior_path_codes
from deephash.models.pretrained import load_backbone_weights, load_state_dict_file, timm_input_config
from deephash.models.retrieval_model import CODE_RULES, RERANK_VECTORS, RetrievalModel, build_model, channels_last_on_cpu, model_spec
from deephash.models.seed_networks import ClassificationNet, EmbeddingNet, EmbeddingNetL2, SiameseNet, TripletNet
from deephash.models.spec import ModelSpec

__all__ = [
    "BACKBONES",
    "BasicBlock",
    "CODE_RULES",
    "RERANK_VECTORS",
    "ClassificationNet",
    "ClassifierHead",
    "EmbeddingHead",
    "EmbeddingNet",
    "EmbeddingNetL2",
    "FMnistCNN",
    "HEADS",
    "HashHead",
    "IdentityHead",
    "ModelSpec",
    "Normalize",
    "ResNetCifar",
    "RetrievalModel",
    "SeedCNN",
    "SiameseNet",
    "TripletNet",
    "build_model",
    "create_backbone",
    "channels_last_on_cpu",
    "fit_linear_hash",
    "fit_pca_codes",
    "linear_hash_codes",
    "itq_rotation",
    "list_backbones",
    "load_backbone_weights",
    "load_state_dict_file",
    "model_spec",
    "pca_codes",
    "pca_projection",
    "pca_rows",
    "random_rotation",
    "posterior_path_codes",
    "register_backbone",
    "sign_codes",
    "timm_backbone",
    "timm_input_config",
]
