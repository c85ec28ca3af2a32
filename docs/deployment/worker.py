"""The FSM worker of docs/deployment.md: owns the state machine, commits a transition a second.

Run in its own container (docker-compose.yml, pod.yaml); readers in other containers attach to the
store by name through the shared /dev/shm. STORE_NAME picks the store ("robot-fsm").
"""

import asyncio
import os

from shmstore.fsm import AsyncStateStore, FsmState, create_transition, next_snapshot

NAME = os.environ.get("STORE_NAME", "robot-fsm")
PERIOD = float(os.environ.get("PERIOD", "1.0"))
CYCLE = (FsmState.IDLE, FsmState.ACTIVE)


async def main() -> None:
    store = AsyncStateStore(name=NAME)  # created by the first process, opened by the others
    try:
        current = await store.initialize_if_empty()
        step = 0
        while True:
            target = CYCLE[step % len(CYCLE)]
            t = create_transition(from_state=current.state, to_state=target, trigger="TICK")
            current = await store.set(next_snapshot(current, target, f"tick {step}", t))
            step += 1
            await asyncio.sleep(PERIOD)
    finally:
        await store.close()  # the store stays in /dev/shm for the readers and the next start


if __name__ == "__main__":
    asyncio.run(main())
