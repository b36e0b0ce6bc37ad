"""Records -> tokenised samples with pixels -> batches: the data pipeline's entry module.

The mental model, one job per module (as torchtitan's components/data/ splits it):

    DataConfig        data/config.py           the recipe's ``data:`` section and its own rules
    SampleBuilder     data/sample_builder.py   one record -> one sample (tokens, labels, pixels) or a
                                               drop marker saying why not (too long, bad image)
    load_data,        data/map_style.py        map-style: every record read and validated, every image
    VLMDataset                                 file checked, before a model is built; item i built on demand
    StreamingVLMDataset data/streamed_dataset.py  streamed shards: each worker one reader, yielding batches
    build_dataloader, data/loader.py           the resumable loader: exact position (sampler or readers),
    ResumableLoader                            drop counters, max_bad_images over the whole run
                      data/collate.py          samples -> the batch dict (padding or packing into rows)

Tokenisation happens lazily in ``__getitem__`` and image decoding therefore in DataLoader workers.
The trainer calls two functions: ``load_data`` when it starts (records validated, image files checked,
before any model is built) and ``build_dataloader``::

    records = load_data(config)            # DataConfig(paths=["train.json"], image_size=448, max_len=2048)
    loader = build_dataloader(config, tokenizer, num_image_tokens=256, batch_size=8, rank=r, world_size=w,
                              records=records)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...           # the batch dict of docs/design.md section 2
        loader.stats.total                 # counters (also logged at the end of every epoch)
    ckpt["data"] = loader.state_dict()     # position inside the epoch; loader.load_state_dict(...) resumes

Two lengths, two names: ``data.max_len`` limits one sample; a packed row holds ``DataConfig.row_len`` tokens
(``data.pack_len`` when set, else ``max_len``).
"""

from data.config import DataConfig
from data.loader import ResumableLoader, build_dataloader
from data.map_style import Records, VLMDataset, find_missing_images, load_data
from data.sample_builder import SampleBuilder, bad_image_marker
from data.streamed_dataset import StreamingVLMDataset, streamed_pair

__all__ = [
    "DataConfig",
    "Records",
    "ResumableLoader",
    "SampleBuilder",
    "StreamingVLMDataset",
    "VLMDataset",
    "bad_image_marker",
    "build_dataloader",
    "find_missing_images",
    "load_data",
    "streamed_pair",
]
