"""Train an EleutherAI sparsify TopK SAE (`SparseCoder`) on a crowstream dataset.

    pip install 'crowstream[sparsify]'
    python examples/train_with_sparsify.py crowstream-demo encoder.layer.5 --steps 500

sparsify's own `Trainer` runs a model and captures activations itself; on stored vectors
its `SparseCoder` takes a short loop instead: forward, the fraction of variance
unexplained (`fvu`, plus the AuxK loss that revives dead latents), backward, drop the
gradient parallel to the decoder directions, step, renormalise the decoder. Batches come
from `cs.stream` (`epochs=None`: full batches forever), scaled by crowstream's exact
SAELens factor; the loop never calls `.item()` per step, so a GPU is never stalled: the
losses are summed on the device and read every `--log-every` steps.
"""

from __future__ import annotations

import argparse

import crowstream as cs


def train(out: str, module: str, *, expansion: int = 8, k: int = 32, steps: int = 500,
          batch_size: int = 4096, lr: float = 5e-4, auxk_alpha: float = 1 / 32,
          shuffle_buffer: int = 262_144, device: str = "cpu", log_every: int = 100,
          dead_steps: int = 200, save: str | None = None):
    """-> (the trained `SparseCoder`, [(step, mean fvu over the last `log_every` steps)])."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    d = len(cs.stats(out, module)["mean"])
    stream = cs.stream(out, module, batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                       epochs=None, normalize="mean_norm", dtype="float32", device=device)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=expansion * d, k=k), device=device,
                      dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    window, log = torch.zeros((), device=device), []
    since_fired = torch.zeros(expansion * d, dtype=torch.long, device=device)
    for step, batch in zip(range(1, steps + 1), stream):
        # latents silent for `dead_steps` steps get the AuxK loss (kept on the device)
        result = sae(batch["vector"], dead_mask=since_fired > dead_steps)
        loss = result.fvu + auxk_alpha * result.auxk_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
        window += result.fvu.detach()
        since_fired += 1
        since_fired[result.latent_indices.flatten()] = 0
        if step % log_every == 0:  # the only host sync
            log.append((step, float(window) / log_every))
            print(f"step {step:>6}  fvu {log[-1][1]:.4f}", flush=True)
            window.zero_()
    if save:
        sae.save_to_disk(save)
        print(f"saved {save}/")
    return sae, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a crowstream output directory")
    parser.add_argument("module", help="module name as stored (crowstream info OUT)")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--shuffle-buffer", type=int, default=262_144)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--save", default="sparsify-sae")
    args = parser.parse_args()
    train(args.out, args.module, expansion=args.expansion, k=args.k, steps=args.steps,
          batch_size=args.batch_size, lr=args.lr, shuffle_buffer=args.shuffle_buffer,
          device=args.device, log_every=args.log_every, save=args.save)


if __name__ == "__main__":
    main()
