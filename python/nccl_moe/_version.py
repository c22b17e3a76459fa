# The package version; the library's is nccl_moe.library_version() (NCCL_MOE_VERSION_CODE).
__version__ = "0.1.0"
