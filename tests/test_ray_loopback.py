"""A Ray that a command starts for itself listens on loopback only: `serve --engine ray` and
`generate --renderer blender --ray` without an address (trust round 5, m6: rendering's local Ray
listened on 0.0.0.0)."""
import subprocess
import sys
import time

import pytest

from serving import ENV, HAVE, WHY, descendants, listening

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE["ray"], reason=WHY["ray"])]

SCRIPT = """
import sys, time, ray
import qgmrn.data.ray_render as rr
started = []
import qgmrn.ray_loopback as lb
orig = lb.start_ray_on_loopback
lb.start_ray_on_loopback = lambda *a, **k: (started.append(1), orig(*a, **k))[1]
ray.shutdown = lambda *a, **k: None           # keep the local Ray up to look at its sockets
try:
    rr.render_on_ray(__import__('pathlib').Path('/nonexistent'), [('train', 0)], {'size': (8, 8), 'samples': 1}, '',
                     lambda *a: None)
except BaseException:
    pass
print('ready', len(started), ray.is_initialized(), flush=True)
time.sleep(120)
"""


def test_renderings_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.split() == ["ready", "1", "True"], line
        time.sleep(2)
        addresses = listening(descendants(proc.pid) | {proc.pid})
        assert addresses, "found none of Ray's listening sockets"
        exposed = [a for a in addresses if not a.startswith(("127.", "[::1]", "[::ffff:127."))]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        import os
        import signal
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
