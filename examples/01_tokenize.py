"""Step 1 of the pipeline: prompt -> token ids.

mdref's tokenizer is CLIP's byte-level BPE (OpenAI vocabulary, shipped in weights/clip). A prompt becomes
BOS (49406), its BPE tokens, EOS (49407), then padding with the pad id (49407 here) up to 77 ids.
Writes the ids as OUT/mdref_tokens.npy (OUT: the first argument, default /tmp).

    python examples/01_tokenize.py [OUT]
"""
import sys
from pathlib import Path

import numpy as np

import mdref

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
out.mkdir(parents=True, exist_ok=True)
prompt = "a large red circle on the left, blue background"

tok = mdref.Tokenizer.from_pretrained(None)          # None: the shipped vocabulary
print(tok)
ids = tok([prompt])                                  # int64 [1, 77]
print(f"prompt: {prompt!r}\nids {ids.dtype} {ids.shape}")

# The BPE pieces behind the ids ('</w>' marks the end of a word).
pieces = tok.backend.encode(tok.clean(prompt), add_special_tokens=False)
n = len(pieces.ids)
print(f"{'pos':>3}  {'id':>6}  token")
print(f"{0:>3}  {ids[0, 0]:>6}  <|startoftext|>")
for i, (token, token_id) in enumerate(zip(pieces.tokens, pieces.ids), start=1):
    assert ids[0, i] == token_id
    print(f"{i:>3}  {token_id:>6}  {token}")
print(f"{n + 1:>3}  {ids[0, n + 1]:>6}  <|endoftext|>")
print(f"{n + 2}..{ids.shape[1] - 1}: padding with id {tok.pad_id}")
print(f"decoded back: {tok.decode(ids[0])!r}")

np.save(out / "mdref_tokens.npy", ids)
print(f"wrote {out / 'mdref_tokens.npy'}")
