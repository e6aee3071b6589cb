"""Train a TopK sparse autoencoder on a crowstream dataset, in plain torch.

    python examples/train_sae.py crowstream-demo encoder.layer.5 --expansion 8 --k 32
    python examples/train_sae.py acts/ transformer.h.6 --steps 20000 --device cuda

Batches come from `cs.stream` (shuffled pool, reads on background threads), scaled by the
dataset's SAELens-style factor sqrt(d) / mean_norm (`normalize="mean_norm"`), so the same
hyper-parameters work across models. The SAE (Gao et al. 2024): z = TopK(W_enc (x - b_dec)
+ b_enc), x_hat = W_dec z + b_dec, decoder rows kept at unit norm, loss = MSE. Every
`--log-every` steps it prints the MSE, the explained variance of the batch and the
fraction of dead latents (no activation in the last `--dead-steps` steps); at the end it
saves the weights with safetensors (scaling factor and settings in the metadata).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import crowstream as cs


class TopKSAE(torch.nn.Module):
    def __init__(self, d: int, latents: int, k: int, mean: torch.Tensor):
        super().__init__()
        self.k = k
        w = torch.randn(d, latents) / d ** 0.5
        w = w / w.norm(dim=0, keepdim=True)
        self.W_enc = torch.nn.Parameter(w.clone())                   # [d, m]
        self.b_enc = torch.nn.Parameter(torch.zeros(latents))       # [m]
        self.W_dec = torch.nn.Parameter(w.t().contiguous())         # [m, d], unit rows
        self.b_dec = torch.nn.Parameter(mean.clone().float())       # [d]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc            # [B, m]
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())

    def forward(self, x: torch.Tensor):
        z = self.encode(x)
        return z @ self.W_dec + self.b_dec, z                       # [B, d], [B, m]

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)


def train(out: str, module: str, *, expansion: int = 8, k: int = 32, steps: int = 2000,
          batch_size: int = 4096, lr: float = 4e-4, shuffle_buffer: int = 262_144,
          seed: int = 0, device: str = "cpu", log_every: int = 100, dead_steps: int = 200,
          save: str | None = None) -> dict:
    """Train; -> {"mse", "explained_variance", "dead_fraction"} of the last logged window."""
    torch.manual_seed(seed)
    stats = cs.stats(out, module)
    d = len(stats["mean"])
    sae = TopKSAE(d, expansion * d, k, stats["mean"] * stats["scaling_factor"]).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    stream = cs.stream(out, module, batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                       seed=seed, epochs=None, normalize="mean_norm", device=device)
    last_fired = torch.zeros(expansion * d, dtype=torch.long, device=device)
    # summed on the device, read at each log line only: no host sync per step
    window = {"mse": torch.zeros((), device=device), "ev": torch.zeros((), device=device), "n": 0}
    metrics = {}
    started = time.perf_counter()
    for step, batch in zip(range(1, steps + 1), stream):
        x = batch["vector"]                                         # [B, d], normalised
        x_hat, z = sae(x)
        error = (x_hat - x).pow(2).sum(-1)                          # [B]
        loss = error.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sae.normalize_decoder()
        with torch.no_grad():
            total = (x - x.mean(0)).pow(2).sum(-1).mean()
            last_fired[(z > 0).any(0)] = step
            window["mse"] += loss.detach() / d
            window["ev"] += 1 - loss.detach() / total
            window["n"] += 1
        if step % log_every == 0 or step == steps:
            silent = step - last_fired >= dead_steps                # [m]
            dead = silent.float().mean().item() if step >= dead_steps else 0.0
            metrics = {"step": step, "mse": float(window["mse"]) / window["n"],
                       "explained_variance": float(window["ev"]) / window["n"],
                       "dead_fraction": dead, "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(metrics), flush=True)
            window = {"mse": window["mse"].zero_(), "ev": window["ev"].zero_(), "n": 0}
    if save:
        from safetensors.torch import save_file

        save_file({name: p.detach().cpu().contiguous() for name, p in sae.named_parameters()},
                  save, metadata={"module": module, "k": str(k), "d": str(d),
                                  "latents": str(expansion * d),
                                  "scaling_factor": str(stats["scaling_factor"]),
                                  "source": out})
        print(f"saved {save}")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a crowstream output directory")
    parser.add_argument("module", help="module name as stored (crowstream info OUT)")
    parser.add_argument("--expansion", type=int, default=8, help="latents = expansion x d")
    parser.add_argument("--k", type=int, default=32, help="active latents per row")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--shuffle-buffer", type=int, default=262_144)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--dead-steps", type=int, default=200)
    parser.add_argument("--save", default="sae.safetensors")
    args = parser.parse_args()
    train(args.out, args.module, expansion=args.expansion, k=args.k, steps=args.steps,
          batch_size=args.batch_size, lr=args.lr, shuffle_buffer=args.shuffle_buffer,
          seed=args.seed, device=args.device, log_every=args.log_every,
          dead_steps=args.dead_steps, save=args.save)


if __name__ == "__main__":
    main()
