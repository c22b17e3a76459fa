"""Exceptions raised by nccl_moe: every failed library call carries its ncclResult_t and ncclMoeGetLastError()."""

# ncclResult_t values (nccl.h); the names are what NCCL prints.
RESULT_NAMES = {
    0: "ncclSuccess",
    1: "ncclUnhandledCudaError",
    2: "ncclSystemError",
    3: "ncclInternalError",
    4: "ncclInvalidArgument",
    5: "ncclInvalidUsage",
    6: "ncclRemoteError",
    7: "ncclInProgress",
}


class NcclMoeError(RuntimeError):
    """A call into libnccl_moe (or NCCL, or the CUDA runtime) failed.

    Attributes:
        result: the ncclResult_t code (int); RESULT_NAMES maps it to its name.
        message: the library's explanation (ncclMoeGetLastError of the calling thread), which names the argument or
            the state that made the call fail.
    """

    def __init__(self, result: int, message: str = ""):
        super().__init__(result, message)
        self.result = int(result)
        self.message = message

    @property
    def result_name(self) -> str:
        return RESULT_NAMES.get(self.result, f"ncclResult_t({self.result})")

    def __str__(self) -> str:
        return f"{self.message} [{self.result_name}]"


class NcclMoeArgumentError(NcclMoeError, ValueError):
    """ncclInvalidArgument: an argument's value is out of the documented range (the message names it)."""
