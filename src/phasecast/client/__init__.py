"""A Python client for Phasecast: watch a job's progress, or wait for it to end.

```python
from phasecast.client import PhasecastClient

async with PhasecastClient("http://127.0.0.1:8000", token=get_token) as client:
    async for state in client.watch("comic-42"):
        print(state.phase, state.progress)
    final = await client.wait("comic-43")
```

See docs/client.md.
"""

from phasecast.client.core import ClientStats, PhasecastClient
from phasecast.client.errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    ForbiddenError,
    JobNotFoundError,
    ProtocolError,
)
from phasecast.client.policy import RetryPolicy
from phasecast.client.tokens import TokenFunction, TokenSpec
from phasecast.model import JobError, JobState, Phase

__all__ = [
    "AuthenticationError",
    "ClientError",
    "ClientStats",
    "ConnectionFailedError",
    "ForbiddenError",
    "JobError",
    "JobNotFoundError",
    "JobState",
    "Phase",
    "PhasecastClient",
    "ProtocolError",
    "RetryPolicy",
    "TokenFunction",
    "TokenSpec",
]
