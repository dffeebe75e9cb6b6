"""The service's settings: one pydantic-settings class, read from ``CBIR_*`` environment variables.

``cbir serve`` fills ``index_dir``/``host``/``port`` from its options; everything else comes from
the environment (or a ``.env`` file), e.g. ``CBIR_API_KEY``, ``CBIR_MAX_UPLOAD_MB``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_K_LIMIT = 1000  # the largest CBIR_MAX_K one may configure


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CBIR_", env_file=".env", extra="ignore")

    index_dir: Path = Field(Path("index"), description="Index directory written by `cbir index`.")
    db_url: str | None = Field(
        None, description="Catalogue URL; default: the one the index directory records.")
    checkpoint: Path | None = Field(
        None, description="Model checkpoint; default: the one the index was built with. Its "
                          "sha256 must match the index's.")
    api_key: str | None = Field(
        None, description="When set, every endpoint but /healthz, /readyz, the page and the docs "
                          "needs it (Authorization: Bearer <key> or X-API-Key: <key>).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_upload_mb: float = Field(32.0, gt=0, description="Largest request body accepted (MB).")
    max_image_pixels: int = Field(4096 * 4096, gt=0,
                                  description="Largest 2-D image accepted (pixels).")
    max_volume_voxels: int = Field(512 * 512 * 512, gt=0,
                                   description="Largest NIfTI / multi-frame DICOM accepted "
                                               "(voxels, after decompression).")
    max_zip_members: int = Field(4096, gt=0, description="Most files a .zip of a DICOM series "
                                                         "may hold.")
    max_zip_mb: float = Field(256.0, gt=0, description="Largest total size the files of a .zip "
                                                       "of a DICOM series may inflate to (MB).")
    decode_memory_mb: float = Field(
        3072.0, gt=0, description="Memory all uploads being decoded at once may take together "
                                  "(MB); an upload waits for its share, and one needing more "
                                  "than all of it is refused (413).")
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1, le=MAX_K_LIMIT, description="Largest k a request may ask for.")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$",
                        description="Where the model runs: auto picks CUDA when present.")
    inference_workers: int = Field(
        1, ge=1, le=16, description="Model calls run at once (each on its own thread).")
    reload_interval_s: float = Field(
        1.0, ge=0, description="How often the server asks the catalogue for a new active "
                               "generation (after `cbir index add/remove`) and loads it without "
                               "a restart (seconds); 0: never, restart to serve a new one.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_zip_bytes(self) -> int:
        return int(self.max_zip_mb * 1024 * 1024)

    @property
    def decode_memory_bytes(self) -> int:
        return int(self.decode_memory_mb * 1024 * 1024)
