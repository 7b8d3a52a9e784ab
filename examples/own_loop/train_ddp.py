"""Your own PyTorch DDP loop, with distgrow deciding the batch, its split, the LR and momentum.

torchrun --nproc_per_node=2 examples/own_loop/train_ddp.py examples/own_loop/config.yaml
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
from distgrow.loop import GrowthBatchSampler, GrowthSchedule, MicroBatchCollate

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
optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)

schedule = GrowthSchedule(cfg, len(dataset), rank, world)
loader = DataLoader(
    dataset,
    batch_sampler=GrowthBatchSampler(schedule),
    collate_fn=MicroBatchCollate(dataset),
    num_workers=args.loader_workers,
    pin_memory=torch.cuda.is_available(),
)
for epoch in schedule.epochs():
    batches = iter(loader)  # this rank's micro-batches for the rest of the epoch, prefetched
    loss_sum = torch.zeros(())
    for update in schedule.updates():
        for group in optimizer.param_groups:
            group["lr"], group["momentum"] = update.lr, update.momentum
        for micro in update.micro_batches:
            x, y = next(batches)
            with nullcontext() if micro.sync else model.no_sync():  # all-reduce at the last
                if micro.seed is not None:
                    torch.manual_seed(micro.seed)  # dropout masks as distgrow draws them
                loss = F.cross_entropy(model(x), y, reduction="sum")
                (loss * update.loss_scale).backward()  # DDP's mean → the global batch's mean
            loss_sum += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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
