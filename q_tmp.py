import torch
from model.config import ModelConfig
from model.fast import FusedDecoder
from model.fast.decoder import quantize_int8
from model.kv_cache import KVCache
from tests.conftest import TINY, build_model
cfg = ModelConfig(**{**TINY, "d_model": 64, "d_ff": 192, "n_head": 4})
m = build_model(cfg, seed=12)
tok, pos = torch.tensor([5, 9]), torch.tensor([0, 0])
with torch.no_grad():
    ref = m(tok[:, None], cache=KVCache(cfg, 2), pos=pos).logits[:, -1]
for w in ("float32", "float16", "int8"):
    got = FusedDecoder(m, weights=w)(tok, KVCache(cfg, 2), pos).logits
    print(w, float((got - ref).abs().max()), float(ref.abs().max()), float(ref.std()))
# emulate int8 in torch: quantize the weights only
import copy
m2 = copy.deepcopy(m)
with torch.no_grad():
    for mod in m2.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.shape != m2.wte.weight.shape:
            q, s = quantize_int8(mod.weight.t())
            mod.weight.copy_((q.float() * s).t())
    ref2 = m2(tok[:, None], cache=KVCache(cfg, 2), pos=pos).logits[:, -1]
print("weights-only int8 emu", float((ref2 - ref).abs().max()))
