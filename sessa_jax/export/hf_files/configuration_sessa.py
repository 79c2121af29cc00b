"""Hugging Face config of a sessa_jax decoder LM (Sessa, Transformer or Mamba-style blocks).

Shipped beside an export made by ``sessa-export --format hf`` (package sessa_jax); loaded by
``AutoConfig`` / ``AutoModelForCausalLM`` with ``trust_remote_code=True``.
"""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig


class SessaConfig(PreTrainedConfig):
    """Architecture of the model in ``modeling_sessa.py``.

    family: "sessa" | "transformer" | "mamba"; hidden_size D; num_attention_heads H;
    num_key_value_heads Hkv (grouped-query attention); intermediate_size: SwiGLU MLP width
    after every mixer block (0: none); rope_theta, use_rope: rotary embedding of queries and
    keys (interleaved pairs); gamma_max: Sessa's feedback gain bound; state_size, expand,
    conv_kernel, time_step_rank: the Mamba block; num_classes: an optional class head.
    """

    model_type = "sessa_jax"

    def __init__(self, family="sessa", vocab_size=256, hidden_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=None, intermediate_size=0,
                 use_rope=True, rope_theta=10000.0, layer_norm_eps=1e-5, gamma_max=0.999,
                 state_size=16, expand=2, conv_kernel=4, time_step_rank=None, num_classes=0,
                 tie_word_embeddings=True, **kwargs):
        if family not in ("sessa", "transformer", "mamba"):
            raise ValueError(f"family={family!r}: expected 'sessa', 'transformer' or 'mamba'")
        self.family = family
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.layer_norm_eps = layer_norm_eps
        self.gamma_max = gamma_max
        self.state_size = state_size
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.time_step_rank = time_step_rank or -(-hidden_size // 16)
        self.num_classes = num_classes
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
