"""A byte-level transformer language model in a plain PyTorch loop.

The small GPT of the training job (4 pre-LayerNorm blocks, d_model 64, 4 heads, a 64-byte
context) learns to predict the next byte of the Python standard library's own sources: no
download, the interpreter's ``*.py`` files split by file into training and validation text.
kfrob preconditions every layer (the ``nn.Linear`` projections and head, the embeddings,
the LayerNorms) with its defaults: Adam in their Kronecker eigenbasis. The script prints
the validation loss in nats per byte (ln 256 ≈ 5.55 at the start). About a minute on 2 CPU cores:

    python examples/transformer.py [--steps 500]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kfrob import FrobPreconditionedSGD
from kfrob.job.transformer import transformer
from kfrob.text import evaluation_starts, load_corpus, windows

CONTEXT, BATCH = 64, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--train-bytes", type=int, default=4_000_000)
    args = parser.parse_args()
    corpus = load_corpus(train_bytes=args.train_bytes, val_bytes=500_000)
    print(corpus.source)
    x_val, y_val = windows(corpus.val, evaluation_starts(len(corpus.val), CONTEXT, 128), CONTEXT)

    torch.manual_seed(0)
    model = transformer(d_model=64, n_layers=4, n_heads=4, context=CONTEXT)
    generator = torch.Generator().manual_seed(1)  # the MC Fisher's sampler
    opt = FrobPreconditionedSGD(model, lr=3e-3, loss="cross_entropy", generator=generator)
    order = torch.Generator().manual_seed(0)  # where the training windows start
    for step in range(1, args.steps + 1):
        starts = torch.randint(len(corpus.train) - CONTEXT, (BATCH,), generator=order)
        x, y = windows(corpus.train, starts, CONTEXT)  # (B, T) bytes and the next bytes
        opt.zero_grad()
        logits = model(x)  # (B, T, 256)
        F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                val = F.cross_entropy(model(x_val).reshape(-1, 256), y_val.reshape(-1))
            print(f"step {step}: validation {val.item():.3f} nats/byte")


if __name__ == "__main__":
    main()
