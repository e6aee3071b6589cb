"""Train a SAELens TopK SAE on a crowstream dataset: `cs.stream` is SAELens' data provider.

    pip install 'crowstream[sae]'
    python examples/train_with_saelens.py crowstream-demo encoder.layer.5 --steps 500

SAELens 6's `SAETrainer` takes any iterator of `[B, d]` tensors as `data_provider`. The
stream hands it shuffled batches already scaled by crowstream's exact SAELens scaling
factor (`normalize="mean_norm"`, from the stored statistics: no estimation pass), and the
factor is folded into the weights at the end, so the saved SAE works on raw activations.
"""

from __future__ import annotations

import argparse

import crowstream as cs


def train(out: str, module: str, *, expansion: int = 8, k: int = 32, steps: int = 500,
          batch_size: int = 4096, lr: float = 4e-4, shuffle_buffer: int = 262_144,
          device: str = "cpu", save: str | None = None):
    """-> the trained `TopKTrainingSAE` (scaling factor folded in)."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    stats = cs.stats(out, module)
    d = len(stats["mean"])
    stream = cs.stream(out, module, batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                       epochs=None, normalize="mean_norm", device=device)
    data_provider = (batch["vector"] for batch in stream)  # Iterator[[B, d] tensor]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=expansion * d, k=k,
                                                device=device))
    config = SAETrainerConfig(total_training_samples=steps * batch_size,
                              train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
                              device=device,
                              dead_feature_window=max(steps // 4, 1))
    trainer = SAETrainer(config, sae, data_provider)
    sae = trainer.fit()
    sae.fold_activation_norm_scaling_factor(stats["scaling_factor"])
    if save:
        sae.save_model(save)
        print(f"saved {save}/")
    return sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a crowstream output directory")
    parser.add_argument("module", help="module name as stored (crowstream info OUT)")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--shuffle-buffer", type=int, default=262_144)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", default="saelens-sae")
    args = parser.parse_args()
    train(args.out, args.module, expansion=args.expansion, k=args.k, steps=args.steps,
          batch_size=args.batch_size, lr=args.lr, shuffle_buffer=args.shuffle_buffer,
          device=args.device, save=args.save)


if __name__ == "__main__":
    main()
