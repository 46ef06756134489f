"""Decoding, on the host and on the device. The loader's host threads may only read JPEG bytes and
draw each sample's crop; this module then decodes the batch where it trains (nvJPEG on CUDA,
libjpeg-turbo when the CPU is the device) and crops, resizes and flips it there in batched form.

    stage = DeviceStage(device, train=True, crop_ratio=0.875)
    images = stage(blob, sizes, host_images, params, indices, size_px)  # uint8 N x 3 x S x S, channels_last
    for batch in prefetch(host_batches, work, device):                  # made a batch ahead, in a thread

- The decoders are two functions, `decode_image` (host, any format) and `decode_jpegs` (a batch,
  on a device): TorchCodec's when it imports (the successor of torchvision's image decoding,
  deprecated since torchvision 0.29; bit-identical to it on the CPU), else torchvision.io's.
  `DECODER` names the library that runs.
- Only baseline (sequential Huffman) three-component JPEGs go to the device decoder, the kind the
  converters write; progressive, CMYK, grayscale and non-JPEG images are decoded on the host by
  the worker that read them (`jpeg_header` tells them apart without decoding) and counted.
- Crop + resize is a pair of batched matrix products per group of crops of similar size (so a
  batch's memory follows the sum of its crops, not N x its largest image): for each sample a
  vertical and a horizontal weight matrix with the antialiased bilinear (triangle) filter that
  torchvision's resize uses on the crop, so the pixels match the host path's within rounding (its
  uint8 kernel rounds between its two passes; this one does not). A horizontal flip is the
  horizontal matrix reversed.
"""
import queue
import re
import struct
import threading

import torch

from core.errors import LoaderError
from loaders.common import val_resize_px

try:  # the successor of torchvision.io's decoders; torchvision's are the fallback
    from torchcodec.decoders import decode_image as _decode_image
    from torchcodec.decoders import decode_jpeg as _decode_jpeg
    DECODER, RGB = "torchcodec", "RGB"
except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch than this one
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _decode_image
    from torchvision.io import decode_jpeg as _decode_jpeg
    DECODER, RGB = "torchvision.io", ImageReadMode.RGB

SOF_SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded: nvJPEG's batched path
SOF_OTHER = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # progressive, lossless, ...
STANDALONE = {0x01, *range(0xD0, 0xD9)}  # markers without a length: TEM, RSTn, SOI

SOF_ALL = {*SOF_SEQUENTIAL, *SOF_OTHER}
_SOI, _SEGMENT, _FRAME = struct.Struct(">H"), struct.Struct(">BBH"), struct.Struct(">BHHB")  # big-endian fields


def jpeg_header(data) -> tuple[int, int, bool] | None:
    """(height, width, device_ok) from a JPEG's frame header, or None when `data` (bytes or a
    memoryview) is no JPEG. device_ok: baseline or extended sequential, 8 bits per sample, with 3
    components (YCbCr), what nvJPEG's batched decoder takes; progressive, 12-bit (extended
    sequential allows it), CMYK and grayscale JPEGs are not.

    It walks the segments (a few before the frame), each read with one struct call: searching for
    an SOF marker's bytes instead could land inside an APP segment (an EXIF thumbnail has its own)."""
    n = len(data)
    if n < 4 or _SOI.unpack_from(data)[0] != 0xFFD8:
        return None
    i = 2
    while i + 4 <= n:
        ff, marker, length = _SEGMENT.unpack_from(data, i)
        if ff != 0xFF:
            return None
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
        elif marker in STANDALONE:  # a marker without a segment
            i += 2
        elif marker in SOF_ALL:
            if i + 10 > n:
                return None
            bits, height, width, components = _FRAME.unpack_from(data, i + 4)
            return height, width, marker in SOF_SEQUENTIAL and bits == 8 and components == 3
        else:
            i += 2 + length
    return None


def decode_image(data: torch.Tensor) -> torch.Tensor:
    """Encoded bytes (JPEG, PNG, ...; a 1-D uint8 tensor) -> uint8 3 x H x W RGB on the host."""
    return _decode_image(data, mode=RGB)


def decode_error(e: Exception) -> str:
    """A decoder's message, one line, without the C++ location that torchvision and TorchCodec put
    first ('read_header_and_start, /.../DecodeJpeg.cpp:208, Invalid JPEG file structure: ...')."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", first)


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG byte tensors (on the host) -> uint8 3 x H x W RGB images on `device`, in one batched call."""
    return list(_decode_jpeg(datas, mode=RGB, device=device)) if datas else []


def resize_weights(start: torch.Tensor, length: torch.Tensor, out_total: torch.Tensor, first: torch.Tensor,
                   out_px: int, full_px: int) -> torch.Tensor:
    """Per sample, the out_px x full_px matrix that maps an image row (or column) of full_px pixels to
    out_px outputs: the window [start, start + length) resized to out_total pixels with the
    antialiased bilinear filter (PIL's, as torch's antialias=True computes it, support clipped to
    the window), outputs first .. first + out_px - 1 of it. All arguments are float N-vectors.

    Train: window = the crop box, out_total = out_px, first = 0. Val: window = the whole side,
    out_total = the resized side, first = the center crop's offset."""
    device = start.device
    scale = (length / out_total)[:, None, None]  # N x 1 x 1: input pixels per output pixel
    support = scale.clamp(min=1.0)  # the triangle's half-width in input pixels
    inv = 1.0 / support
    center = scale * (first[:, None, None] + torch.arange(out_px, device=device)[None, :, None] + 0.5)
    lo = (center - support + 0.5).floor().clamp(min=0)
    hi = torch.minimum((center + support + 0.5).floor(), length[:, None, None])
    local = torch.arange(full_px, device=device)[None, None, :] - start[:, None, None]  # window coordinates
    weights = (1 - ((local - center + 0.5) * inv).abs()).clamp(min=0) * ((local >= lo) & (local < hi))
    return weights / weights.sum(-1, keepdim=True)


def crop_boxes(params: torch.Tensor, size_px: int, train: bool, crop_ratio: float) -> tuple:
    """The weight-matrix arguments of each sample, per axis: params is N x 5 (top, left, h, w, flip)
    for train, N x 2 (h, w) for val (its crop is the center of the shorter side resized to
    size_px / crop_ratio, as torchvision's Resize + CenterCrop compute it)."""
    p = params.to(torch.float64)
    if train:
        top, left, h, w = p.unbind(1)[:4]
        size = torch.full_like(h, float(size_px))
        zero = torch.zeros_like(h)
        return (top, h, size, zero), (left, w, size, zero)
    h, w = p.unbind(1)
    short_px = val_resize_px(size_px, crop_ratio)
    tall = h >= w
    # torchvision: the shorter side to short_px, the longer to int(short_px * long / short)
    out_h = torch.where(tall, (short_px * h / w).floor(), torch.full_like(h, short_px))
    out_w = torch.where(tall, torch.full_like(w, short_px), (short_px * w / h).floor())
    top, left = ((out_h - size_px) / 2).round(), ((out_w - size_px) / 2).round()  # CenterCrop's offsets
    zero = torch.zeros_like(h)
    return (zero, h, out_h, top), (zero, w, out_w, left)


def source_spans(start: torch.Tensor, length: torch.Tensor, out_total: torch.Tensor, first: torch.Tensor,
                 out_px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the pixels [origin, origin + extent) of an image side that resize_weights' outputs
    first .. first + out_px - 1 read (its arguments, float64 on the host): the crop box for train, the
    part of the image under the center crop for val. One pixel wider either way than the filter's
    support, against float32's rounding where the weights are computed; outside it they are zero."""
    scale = length / out_total
    support = scale.clamp(min=1.0)
    lo = ((scale * (first + 0.5) - support + 0.5).floor() - 1).clamp(min=0)
    hi = torch.minimum((scale * (first + out_px - 0.5) + support + 0.5).floor() + 1, length)
    return (start + lo).long(), (hi - lo).long()


def plan_groups(heights: list[int], widths: list[int], slack: float = 2.0) -> list[list[int]]:
    """The samples (indices) in groups that are each padded to their tallest and widest member: the
    largest first, each into the first group whose padded size (members x tallest x widest) stays
    within `slack` x the sum of its members' sizes with it, else into a new one. So a batch's padded
    size is at most `slack` x the sum of its crops, whatever its largest image. Measured on
    RandomResizedCrop boxes of ImageNet-sized photos at batch 256: 3-4 groups; val: 1."""
    groups, bounds = [], []  # bounds: [tallest, widest, sum of sizes] per group
    for i in sorted(range(len(heights)), key=lambda i: heights[i] * widths[i], reverse=True):
        h, w = heights[i], widths[i]
        for group, bound in zip(groups, bounds):
            tall, wide, total = max(bound[0], h), max(bound[1], w), bound[2] + h * w
            if (len(group) + 1) * tall * wide <= slack * total:
                group.append(i)
                bound[:] = tall, wide, total
                break
        else:
            groups.append([i])
            bounds.append([h, w, h * w])
    return groups


def padded_float(crops: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """uint8 3 x h x w crops (strided views into their images) -> float32 n x 3 x height x width,
    zero-padded: one copy kernel per crop (converting as it copies). Crops of separate images have
    no common stride, so no one batched kernel gathers them (a nested tensor's padding would copy
    each crop out first, and pads uint8 image by image on CUDA: its padding kernel is float-only)."""
    out = torch.zeros((len(crops), 3, height, width), dtype=torch.float32, device=crops[0].device)
    for slot, crop in zip(out, crops):
        slot[:, :crop.shape[1], :crop.shape[2]].copy_(crop)
    return out


def crop_resize(images: list[torch.Tensor], params: torch.Tensor, size_px: int, train: bool,
                crop_ratio: float) -> torch.Tensor:
    """Decoded uint8 3 x H x W images (any sizes, one device) -> uint8 N x 3 x S x S, channels_last:
    each sample's crop resized (and flipped, train) by two batched matrix products per group of
    crops of similar size (plan_groups). Only the pixels a sample's output reads are cut out and
    padded (source_spans), so the memory a batch takes beyond its decoded images is bounded by the
    sum of its crops, not by N x its largest image."""
    device, n = images[0].device, len(images)
    ys, xs = crop_boxes(params, size_px, train, crop_ratio)
    (top, tall), (left, wide) = source_spans(*ys, size_px), source_spans(*xs, size_px)
    groups = plan_groups(tall.tolist(), wide.tolist())
    order = [i for group in groups for i in group]
    flip = params[:, 4].to(torch.float64) if train else torch.zeros(n, dtype=torch.float64)
    # One copy to the device: the weights' arguments, window starts relative to the part cut out.
    table = torch.stack([ys[0] - top, *ys[1:], xs[0] - left, *xs[1:], flip, torch.arange(n, dtype=torch.float64)],
                        1)[order].to(device, torch.float32)
    out = torch.empty((n, 3, size_px, size_px), dtype=torch.uint8, device=device, memory_format=torch.channels_last)
    y0, h, x0, w = top.tolist(), tall.tolist(), left.tolist(), wide.tolist()
    at = 0
    for group in groups:
        rows_in, cols_in = max(h[i] for i in group), max(w[i] for i in group)
        batch = padded_float([images[i][:, y0[i]:y0[i] + h[i], x0[i]:x0[i] + w[i]] for i in group], rows_in, cols_in)
        args = table[at:at + len(group)]
        at += len(group)
        rows = resize_weights(*args[:, 0:4].unbind(1), size_px, rows_in)
        cols = resize_weights(*args[:, 4:8].unbind(1), size_px, cols_in)
        if train:  # a mirrored output is the horizontal matrix read backwards
            cols = torch.where(args[:, 8, None, None].bool(), cols.flip(1), cols)
        resized = rows[:, None] @ batch @ cols[:, None].transpose(-1, -2)  # n x 3 x S x S
        out.index_copy_(0, args[:, 9].long(), resized.round_().clamp_(0, 255).to(torch.uint8))
    return out


class DeviceStage:
    """A host batch of JPEG bytes -> the contract's device batch. Counts the images that were
    decoded on the host instead (`host_decoded`) and the batches nvJPEG refused as a whole
    (`retried`: then each image is decoded alone, and one that still fails is an error naming it)."""

    def __init__(self, device: torch.device, train: bool, crop_ratio: float, name=lambda index: str(index)):
        self.device, self.train, self.crop_ratio, self.name = device, train, crop_ratio, name
        self.host_decoded = self.retried = 0

    def __call__(self, blob: torch.Tensor, sizes: torch.Tensor, host_images: list, params: torch.Tensor,
                 indices: torch.Tensor, size_px: int) -> torch.Tensor:
        sizes_list = sizes.tolist()
        chunks = blob.split([s for s in sizes_list if s > 0])
        decoded = iter(self._decode(list(chunks), [i for i, s in zip(indices.tolist(), sizes_list) if s > 0]))
        host = iter(host_images)
        images = [next(decoded) if s > 0 else next(host).to(self.device, non_blocking=True) for s in sizes_list]
        self.host_decoded += len(host_images)
        return crop_resize(images, params, size_px, self.train, self.crop_ratio)

    def _decode(self, chunks: list[torch.Tensor], indices: list[int]) -> list[torch.Tensor]:
        try:
            return decode_jpegs(chunks, self.device)
        except RuntimeError:  # one bad image fails the whole batched call: find it
            self.retried += 1
            out = []
            for chunk, index in zip(chunks, indices):
                try:
                    out += decode_jpegs([chunk], self.device)
                except RuntimeError as e:
                    raise LoaderError(f"{self.name(index)}: cannot decode it on {self.device} "
                                      f"({decode_error(e)})") from None
            return out


_DONE = object()

# Held by the decode thread around each batch's device work (until that work is complete) and by
# engine.step.StepGraph while it captures: the two never overlap, so nothing the decode thread
# launches (nvJPEG may grow its buffers, the allocator may call cudaMalloc) lands inside a capture.
# Capture is rare (the first steps per input shape); a batch's decode waits for it, and it for the
# batch in flight. No side holds it while waiting for the other's progress (the decode thread
# releases it before it queues the batch), so neither can deadlock.
DEVICE_WORK = threading.Lock()
_STREAMS: dict[int, torch.cuda.Stream] = {}


def decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream this process decodes on, per CUDA device: every epoch and validation
    pass reuses it, and with it the memory the caching allocator keeps per stream. (Streams come
    from a round-robin pool of 32: one per pass would soon come round to the capture stream.)"""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
    return _STREAMS[index]


def prefetch(batches, work, device: torch.device, depth: int = 2):
    """Yield work(batch) for each of `batches`, computed in a thread `depth` batches ahead, on the
    decode stream on CUDA, so batch i + 1 is read and decoded while step i trains.

    The nvJPEG hazard: the hardware JPEG engine does not follow CUDA stream order, so a buffer the
    caching allocator recycles to it could still be read by kernels queued before. The thread
    therefore waits for each batch to be complete (its side stream idle) before it starts the
    next, and the consumer's stream adopts the batch (record_stream), so its memory returns to the
    pool only after the consumer's kernels have run. Each batch's work holds DEVICE_WORK; reading
    the next host batch and queueing the result do not. An exception in the thread is raised here,
    after the batches made before it, in order."""
    out, stop = queue.Queue(maxsize=depth), threading.Event()
    side = decode_stream(device) if device.type == "cuda" else None

    def produce():
        try:
            for batch in batches:
                with DEVICE_WORK:
                    if side is not None:
                        with torch.cuda.stream(side):
                            result = work(batch)
                        side.synchronize()  # complete before the next decode may reuse its memory
                    else:
                        result = work(batch)
                while not stop.is_set():
                    try:
                        out.put(result, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            out.put(e)

    thread = threading.Thread(target=produce, name="device-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            if side is not None:
                for t in item:
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(torch.cuda.current_stream(device))
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting to put, then let it finish its batch
            try:
                out.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
