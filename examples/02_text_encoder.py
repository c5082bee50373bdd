"""Step 2 of the pipeline: token ids -> text embeddings (the UNet's cross-attention context).

The text encoder is CLIP's text transformer (== transformers CLIPTextModel(...).last_hidden_state): token +
position embeddings, causal pre-LayerNorm encoder layers, a final LayerNorm. Uses the embedded default model
(or the untrained 'tiny' preset until one is shipped). Writes OUT/mdref_text_embeddings.npy (OUT: first
argument, default /tmp).

    python examples/02_text_encoder.py [OUT]
"""
import sys
from pathlib import Path

import numpy as np

import mdref

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
out.mkdir(parents=True, exist_ok=True)
pipe = mdref.Pipeline.from_pretrained()              # None: the embedded default model
te = pipe.text_encoder
print(te)

ids = pipe.tokenizer(["a large red circle on the left, blue background", "a purple circle"])  # int64 [2, 77]
with mdref.trace("text_encoder.*") as t:             # record the layer outputs on the way
    h = te(ids)                                      # [2, 77, D]

for name in t.names():
    print(f"{name:<42} {str(t[name].shape):>14}  max|x| {np.abs(t[name]).max():8.3f}")
print(f"ids {ids.shape} -> embeddings {h.shape} {h.dtype}")
eos = ids.argmax(axis=1)                             # the first EOS (49407, also the pad id) sits at argmax
print("pooled (EOS) vector shape:", te.pooled(ids, h).shape, "at positions", eos.tolist())

np.save(out / "mdref_text_embeddings.npy", h)
print(f"wrote {out / 'mdref_text_embeddings.npy'}")
