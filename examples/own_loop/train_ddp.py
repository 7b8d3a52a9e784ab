"""Your own PyTorch DDP loop, with distgrow deciding the batch, its split, the LR and momentum.

torchrun --nproc_per_node=2 examples/own_loop/train_ddp.py examples/own_loop/config.yaml
torchrun --nproc_per_node=2 examples/own_loop/train_ddp.py examples/own_loop/adaptive.yaml

The schedule decides each update when the loop asks for it: with growth.mode=adaptive it grows
from the noise scale the loop measures (DdpNoiseProbe) and reports (observe_noise), in the
middle of an epoch too, at the updates where `distgrow train` grows.
"""

import argparse
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from distgrow import load_config
from distgrow.data import ArrayDataset, load_dataset
from distgrow.engine import DdpNoiseProbe, run_update
from distgrow.loop import GrowthBatchSampler, GrowthSchedule, MicroBatch, MicroBatchCollate
from distgrow.trainer import build_optimizer

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("--save", help="write the final parameters here (rank 0)")
parser.add_argument("--loader-workers", type=int, default=2)
args = parser.parse_args()
cfg = load_config(args.config)
dist.init_process_group("gloo")  # "nccl" on GPUs
rank, world = dist.get_rank(), dist.get_world_size()

# Your data: any map-style Dataset. Here, the training split `distgrow train` reads for this
# config, so that the tests can compare the two loops.
train = load_dataset(cfg.data, seed=cfg.run.seed).train
if not isinstance(train, ArrayDataset):  # an image folder is read sample by sample
    raise SystemExit("this example indexes in-memory tensors: set data.feed=memory")
dataset = TensorDataset(train.x, train.y)
# Your model: here the config's MLP, seeded as distgrow seeds it (the same initial weights).
torch.manual_seed(cfg.run.seed)
layers: list[nn.Module] = [nn.Flatten()]
width = train.x[0].numel()
for hidden in cfg.model.hidden:
    layers += [nn.Linear(width, hidden), nn.ReLU()]
    layers += [nn.Dropout(cfg.model.dropout)] if cfg.model.dropout else []
    width = hidden
model = DistributedDataParallel(nn.Sequential(*layers, nn.Linear(width, int(train.y.max()) + 1)))
optimizer = build_optimizer(cfg.optim, model.parameters())  # optim.name, as distgrow builds it

schedule = GrowthSchedule(cfg, len(dataset), rank, world)
# growth.mode=adaptive / growth.noise_cap: the schedule grows from the measured noise scale.
probe = DdpNoiseProbe(cfg, model) if cfg.growth.measures_noise() else None
loader = DataLoader(
    dataset,
    batch_sampler=GrowthBatchSampler(schedule),
    collate_fn=MicroBatchCollate(dataset),
    num_workers=args.loader_workers,
    pin_memory=torch.cuda.is_available(),
)
losses: list[torch.Tensor] = []  # this epoch's summed micro-batch losses


def loss_of(micro: MicroBatch) -> torch.Tensor:
    """The summed loss of a micro-batch: the loader's next (it reads ``micro.indices``)."""
    x, y = next(batches)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    losses.append(loss.detach())
    return loss


for epoch in schedule.epochs():
    batches = iter(loader)  # this rank's micro-batches for the rest of the epoch, prefetched
    losses.clear()
    for update in schedule.updates():
        update.apply_to(optimizer)  # LR, momentum, and AdamW's β₂ / weight decay when set
        # Each micro-batch: dropout seeded as distgrow seeds it, loss × update.loss_scale (DDP's
        # mean → the global batch's mean), backward; DDP's all-reduce at the last micro-step
        # (a probe's measured update averages the gradients itself).
        run_update(
            update,
            loss_of,
            micro_step=lambda sync: nullcontext() if sync else model.no_sync(),
            hooks=[probe] if probe is not None else [],
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if probe is not None and schedule.step % cfg.growth.adaptive.every == 0:
            decisions = schedule.observe_noise(probe.b_simple, probe.measured)
            for name, values in decisions:
                if rank == 0:  # a growth applies from the next update, mid-epoch too
                    print(f"update {schedule.step}: {name} {values}", flush=True)
            if decisions:
                batches = iter(loader)  # the sampler reads the rest of the epoch anew
    loss_sum = torch.stack(losses).sum()
    dist.all_reduce(loss_sum)
    schedule.end_epoch(loss_sum.item() / len(dataset))  # plateau schedules decide on it
    if rank == 0:
        print(
            f"epoch {epoch + 1}: train loss {loss_sum.item() / len(dataset):.4f}, "
            f"{schedule.step} updates, batch {update.global_batch}"
        )
if rank == 0 and args.save:
    torch.save(model.module.state_dict(), args.save)
dist.destroy_process_group()
