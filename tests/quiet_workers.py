"""pytest plugin: no stray ``KeyboardInterrupt`` traceback from pytest-xdist workers at the end of a run.

When a run ends, the xdist controller asks each worker to stop. execnet (xdist's transport) gives a
worker's code 5 seconds to finish; after that it sends the worker process a SIGINT
(``execnet.gateway_base.WorkerGateway._terminate_execution``). A worker whose final teardown is
slow — freeing a whole session of TensorFlow models and graphs on a loaded 2-core machine — then
gets a ``KeyboardInterrupt`` in whatever runs at that moment, typically a destructor, and prints
``Exception ignored in ... KeyboardInterrupt`` with its traceback after the test summary. The tests
are all done by then (the worker has reported its results), so a worker ignores SIGINT from that
point: it finishes its teardown quietly (execnet still ends it after 10 more seconds at most).
"""
import signal
import threading


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
