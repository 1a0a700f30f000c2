"""Every path and hyperparameter of the pipeline, in one place.

Edit the defaults below once, or override any key on any script's command line as ``--key=value``
(for example ``python train.py --epochs=50 --run_dir=runs/exp2``). Values are converted to the type of
the default; a misspelled key fails at once with the list of valid keys; ``--help`` lists every key with
its default and comment (cli.py reads them from this file). The defaults reproduce the reference recipe;
``--recipe=recommended`` applies RECOMMENDED below, which is what to use on your own data.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Config:
    # --- paths -----------------------------------------------------------------------------------------
    data_dir: str = "data"  # folder holding the image and label sub-folders (read only, never written)
    run_dir: str = "runs/exp"  # every output of a run goes here: splits, checkpoints, predictions, figures
    image_subdir: str = "images"  # sub-folder of data_dir with the image tiles (.png .jpg .tif)
    label_subdir: str = "labels"  # sub-folder of data_dir with the masks, named <stem><mask_suffix>.png
    mask_suffix: str = "_mask"  # a tile a.png has the mask a_mask.png
    # --- split_dataset.py ------------------------------------------------------------------------------
    split_ratios: tuple = (0.8, 0.1, 0.1)  # train, val, test fractions (comma separated on the command line)
    seed: int = 42  # seed for the split, augmentation, weight init and data order
    mask_threshold: int = 0  # 0: masks must hold only 0/255 or 0/1; N>0: values >= N are farmland (lossy masks)
    max_nodata_fraction: float = 0.5  # drop tiles whose nodata share (0, a TIFF's own, transparent) exceeds it
    group_pattern: str = ""  # regex on file stems; tiles whose first group matches share a split ("" = split by tile)
    stratify: bool = True  # reshuffle (seeded) until val and test each hold about the whole set's farmland share
    # --- augment.py ------------------------------------------------------------------------------------
    aug_prob: float = 0.6  # offline: chance that a training tile gets a vertical and a horizontal flipped copy
    preview_count: int = 4  # tiles shown in the augmentation preview figure
    # --- data_preprocess.py / train.py -----------------------------------------------------------------
    recipe: str = "reference"  # reference (these defaults) or recommended (RECOMMENDED below); explicit keys win
    online_aug: bool = True  # random flips and 90-degree rotations of training tiles at load time
    scale_jitter: float = 0.0  # online: random zoom by up to this fraction, below 0.5 (0.1: 0.9x to 1.1x); 0 = off
    colour_jitter: float = 0.0  # online: brightness (gain), contrast, hue jitter up to this (0.1), below 1; 0 = off
    normalise: bool = False  # standardise each band by its training-split mean and std (kept in the checkpoint)
    ignore_index: int = -1  # mask value of unlabelled pixels (e.g. 128), left out of losses and metrics; -1 = none
    bands: str = ""  # 1-based bands to use, e.g. 3,2,1 of a 4-band TIFF; empty = all; predict.py defaults to training's
    rgb_bands: str = ""  # of those, the bands figures show as red, green, blue: 3,2,1 of B,G,R,NIR; empty = first 3
    pixel_size_m: float = 0.0  # metres per pixel of the training tiles; 0 = from GeoTIFF tiles or make_tiles' table
    in_channels: int = 3  # bands of the input images (3 for RGB, 4 for RGB+NIR)
    n_classes: int = 2  # 0 = background, 1 = farmland
    encoder: str = "unet"  # unet (the reference U-Net), resnet18 or resnet34 (ResNet encoder, U-Net decoder)
    encoder_weights: str = ""  # resnet: torchvision ImageNet weights (.pth) to start from; "" = random init
    init_weights: str = ""  # a checkpoint of another run (best.pth) to fine-tune: its weights, not its schedule
    base_width: int = 64  # channels of the first U-Net level (w, 2w, 4w, 8w, 16w); resnet: decoder widths 4w..w/4
    downscale: int = 1  # 1, 2, 4: the network works on tiles shrunk by it; 0 = auto: about 2 m per pixel (unknown: 2)
    dropout: float = 0.3  # Dropout2d rate inside every double convolution
    epochs: int = 100  # training epochs, 1 or more
    time_budget: float = 0.0  # minutes to train: the epochs that fit, planned from timed ones (not epochs); 0 = off
    batch_size: int = 5  # tiles per training step
    lr: float = 1e-4  # Adam learning rate
    loss: str = "ce"  # ce, weighted_ce (class weights from the training split), dice, ce_dice or focal
    focal_gamma: float = 2.0  # focusing exponent of the focal loss, 0 or more (0: cross-entropy)
    weight_decay: float = 1e-8  # Adam weight decay
    step_size: int = 20  # StepLR: epochs between learning-rate drops
    gamma: float = 0.5  # StepLR: factor applied to the learning rate at each drop
    schedule: str = "step"  # learning-rate schedule: step (step_size, gamma) or cosine (down to 0 at the last epoch)
    warmup_epochs: float = 0.0  # linear learning-rate warm-up over this many epochs, step by step; 0 = none
    early_stop: int = 0  # stop after this many epochs without a better val farmland IoU; 0 = never
    keep_epoch: str = "best"  # best.pth holds: best (best val IoU), last (latest epoch), auto (last if val < 3 scenes)
    tune_threshold: bool = False  # pick the farmland probability cut with the best val IoU; predict.py uses it
    precise_bn: int = 0  # recompute BatchNorm statistics over this many training tiles (2+) before validating; 0 = off
    ema: float = 0.0  # decay of a moving average of the weights (e.g. 0.999), validated beside them; 0 = off
    collapse_patience: int = 3  # warn when val predictions hold one class, or the loss stalls, N epochs on end; 0 = off
    tensorboard: bool = True  # also log to run_dir/tensorboard when the tensorboard package is installed
    snapshot_every: int = 10  # also keep the weights of every N-th epoch (0 = never)
    resume: bool = False  # continue from run_dir/checkpoints/last.pth with its saved config; keys given override
    sync_bn: bool = False  # under torchrun, CUDA only: BatchNorm statistics over all ranks' tiles (small batches)
    deterministic: bool = False  # deterministic kernels (slower on GPU): a resumed run then ends bit-identical
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...
    num_workers: int = 2  # DataLoader worker processes (0 = load in the main process)
    channels_last: bool = True  # NHWC layout: same results, faster convolutions (amp=auto on a CPU: if it times faster)
    amp: str = "auto"  # mixed precision: auto (CPU: bf16 or fp32, as timed; GPU: bf16, else fp16), bf16, fp16, off
    cache_tiles: str = "auto"  # keep decoded training tiles in memory: auto (if they fit in 1/4 of free RAM), yes, no
    reuse_memory: bool = True  # keep freed memory for reuse (glibc) rather than fault it in anew: faster CPU passes
    # --- predict.py ------------------------------------------------------------------------------------
    predict_input: str = ""  # image file or folder to predict; empty = the test split
    checkpoint: str = ""  # weights to predict with; empty = run_dir/checkpoints/best.pth
    threshold: float = -1.0  # farmland probability cut, 0 < T < 1 (predict.py, change.py); -1 = the checkpoint's
    predict_batch_size: int = 0  # tiles per forward pass at prediction; 0 = chosen from free memory
    overlay: bool = True  # also save each mask drawn over its photo
    sieve_cells: int = 16  # tiles: farmland pieces and holes under this many working pixels are sieved; 0 = off
    skip_existing: bool = True  # keep masks already written with this checkpoint, so an interrupted run resumes
    window: int = 512  # scenes (GeoTIFFs, larger images): window side, a multiple of 16 (resnet: 32) x downscale
    overlap: int = 128  # scenes: pixels shared by windows, blended; a multiple of 16 (resnet: 32) x downscale
    tta: bool = False  # tiles and scenes: average probabilities over the 8 flips and 90-degree turns (8x slower)
    save_probability: bool = True  # scenes: also write the farmland probability GeoTIFF (percent, 255 = nodata)
    polygons: bool = True  # scenes: also write the fields as polygons (GeoJSON and GeoPackage) with their areas
    min_field_area_ha: float = 0.01  # scenes: minimum mapping unit (ha): smaller islands and holes sieved away
    min_field_pixels: int = 0  # scenes: the minimum mapping unit in pixels where the CRS has no metres (0 = none)
    save_sieved_mask: bool = False  # scenes: also write <stem>_sieved.tif, the sieved mask (with polygons)
    resample_scenes: bool = True  # scenes: predict a scene of another pixel size at the model's pixel_size_m
    simplify_tolerance: float = 0.0  # scenes: simplify field outlines by this distance in CRS units (0 = off)
    backend: str = "torch"  # torch (the checkpoint, in PyTorch) or onnx (the exported model, in onnxruntime, CPU)
    onnx_model: str = ""  # --backend=onnx: the .onnx file; empty = run_dir/export/farmland.onnx
    # --- export_onnx.py --------------------------------------------------------------------------------
    quantize: str = "off"  # off, or int8: also an 8-bit copy for CPUs, offered only if it passes the test split
    calibration_tiles: int = 32  # --quantize=int8: training tiles that calibrate the 8-bit value ranges
    # --- miou.py ---------------------------------------------------------------------------------------
    gallery_size: int = 6  # tiles in each of the worst / best galleries (0 = none)
    boundary_width: int = 3  # pixels inside each parcel edge that the boundary IoU scores
    # --- make_tiles.py ---------------------------------------------------------------------------------
    scene: str = ""  # make_tiles.py: scene GeoTIFF(s) to cut: a file, several separated by commas, or a folder
    labels: str = ""  # make_tiles.py: farmland polygons (.gpkg .shp .geojson) or label raster (.tif, 1/255 = farmland)
    out: str = ""  # make_tiles.py: data folder to write (images/ labels/ tiles.csv), outside the input folders
    tile_size: int = 256  # make_tiles.py: tile side in pixels
    tile_stride: int = 0  # make_tiles.py: pixels between tile origins (0 = tile_size: tiles do not overlap)
    label_where: str = ""  # make_tiles.py: SQL WHERE picking the farmland polygons, e.g. DLBM LIKE '01%' (empty = all)
    label_layer: str = ""  # make_tiles.py: layer of a multi-layer vector file (GeoPackage); empty = its only layer
    label_encoding: str = ""  # make_tiles.py: text encoding of a .dbf without .cpg file, e.g. GBK (empty = the file's)
    mark_unlabelled: bool = False  # make_tiles.py: pixels outside the labels' coverage and nodata get ignore_index
    # --- change.py ---------------------------------------------------------------------------------------
    before: str = ""  # change.py: the earlier date: a scene, or a folder of scenes or tiles paired with after's by name
    after: str = ""  # change.py: the later date: a scene, or a folder whose images pair with before's by file name
    change_margin: float = 0.2  # change.py: change only where both dates are sure: prob >= t+margin, other <= t-margin
    change_edge_tolerance: int = 0  # change.py: a change within N pixels of the other date's farmland stays stable
    change_truth: str = ""  # change.py: a true change map (0-3 on the before grid) to score lost and gained against


# The recommended recipe (--recipe=recommended): what measured best at a modest budget on both real data sets,
# NAIP fields (aerial, 68 % field) and deepglobe_agri (satellite, 21 % farmland), split by scene
# (docs/real_data.md). Keys given on the command line still win.
RECOMMENDED: dict[str, Any] = {
    "normalise": True,  # per-band standardisation: 16-bit and NIR bands on one scale
    "loss": "ce_dice",  # Dice keeps the minority class from being ignored; cross-entropy keeps it calibrated
    "lr": 1e-3,  # with warm-up, Adam tolerates 10x the reference rate; 3e-4 measured lower on NAIP's minority tiles
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    # No dropout, zoom or colour jitter: with them the loss sat near the class prior for epochs on minority
    # farmland (deepglobe_agri test IoU 0.23 against 0.73 without, at equal tile passes); jitter is a choice
    # for long runs (scale_jitter, colour_jitter), not a default for short ones.
    "dropout": 0.0,
    "tune_threshold": True,
    # Validation, best.pth and prediction with BatchNorm statistics of the weights themselves rather than of
    # the last few training batches, which jump between epochs with batches of a few tiles from different scenes.
    "precise_bn": 256,
    # Two validation scenes pick an epoch nearly at random (deepglobe_agri: the picks scored 0.02-0.22 below
    # the last epoch on unseen scenes); with three or more the best by validation IoU is kept.
    "keep_epoch": "auto",
    # The network works at about 2 m per pixel (auto): a third of the time per epoch at 1 m tiles, a fifth at 0.5 m,
    # and better on both real data sets than full resolution (NAIP's 1 m tiles at half: 0.681 against 0.653 on its
    # minority subset; deepglobe_agri's 0.5 m tiles at a quarter: mean 0.465 against 0.396, and 0.415 at half).
    # Tiles without a pixel size work at half resolution. Spending the time saved on more epochs did not pay.
    "downscale": 0,
}
