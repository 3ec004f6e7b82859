"""What sharing the region feature projection buys the default pretraining step (issue 14).

    python benchmarks/shared_projection.py [--rounds 12 --steps 3 --threads 1 --force]

The clean-matching step (``itm_inputs: clean``, the shipped default) runs the encoder on the masked inputs,
on the clean ones, and the ITC image pass on the matched pairs. `InterBertForPreTraining.project_regions`
computes the region feature projection once for all of them; the other side here is the computation before
it, each pass projecting its own features (`clean_inputs` restores them, as the step once did). One process,
the same model and batches, the two sides alternating (K steps each, R rounds) so a busy machine slows both
alike: the per-round ratio is what to quote. Tiny preset (hidden 128, 2+2+2 layers), batch 32, captions of
8-36 tokens and 11-37 regions of 2048-d with 1601-class targets (`common.pretraining_batch`), fwd + bwd +
AdamW. Prints; writes nothing (benchmarks/results is re-run by the integrator on an idle machine).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import check_start_load, load_average, pretraining_batch, time_alternating

from interbert.config import preset
from interbert.modeling import InterBertForPreTraining


def per_pass_projection(model: InterBertForPreTraining, image: dict, mrm_mask, mrm_feature_targets):
    """The step before the projection was shared: the passes get features, each projects every region."""
    return image, model.clean_inputs({"input_ids": None}, image, None, mrm_mask, mrm_feature_targets)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="steps per side per round")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="run above a 1-minute load average of 1.0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = check_start_load(args.force)

    torch.manual_seed(0)
    config = preset("tiny", vocab_size=1200, num_region_classes=1601, embedding_size=128, itc_loss_weight=1.0,
                    itm_inputs="clean")
    model = InterBertForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = []
    for seed in range(args.batches):
        batch = pretraining_batch(config, 32, seed=seed)
        # what the data carries in clean mode: the original features of the masked (zeroed) regions
        originals = torch.rand(batch["region_features"].shape, generator=torch.Generator().manual_seed(seed))
        batch["mrm_feature_targets"] = torch.where(batch["mrm_mask"][..., None], originals, batch["region_features"])
        batches.append(batch)

    sides = {"per pass": lambda image, mask, targets: per_pass_projection(model, image, mask, targets),
             "shared": model.project_regions}

    def run(side: str, start: int) -> None:
        model.project_regions = sides[side]
        for i in range(args.steps):
            model(**batches[(start + i) % len(batches)]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # the sides alternate round by round on the same batches; seconds per round -> per step
    rounds = time_alternating({side: (lambda r, side=side: run(side, r * args.steps)) for side in sides},
                              warmup=1, iterations=args.rounds)
    times = {side: [t / args.steps for t in ts] for side, ts in rounds.items()}
    ratios = [a / b for a, b in zip(times["per pass"], times["shared"])]
    print(f"per pass {statistics.median(times['per pass']) * 1000:.1f} ms/step, shared "
          f"{statistics.median(times['shared']) * 1000:.1f} ms/step (medians); per pass / shared, paired by round: "
          f"median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f} "
          f"({args.rounds} rounds x {args.steps} steps, {args.threads} thread(s); 1-min load average "
          f"{load['load_average_at_start']:.2f} at start, {load_average():.2f} at end)")


if __name__ == "__main__":
    main()
