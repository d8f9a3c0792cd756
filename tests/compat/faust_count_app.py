"""A faust-streaming worker used by test_streams.py: counts records per key in a table.

Run as `python faust_count_app.py worker` with FAUST_BOOTSTRAP, FAUST_INPUT, FAUST_OUTPUT and
FAUST_DATA set. The table's changelog is a compacted topic faust creates on the broker.
"""
import json
import os

import faust

app = faust.App(
    "ringbroker-faust-counter",
    broker=f"kafka://{os.environ['FAUST_BOOTSTRAP']}",
    datadir=os.environ["FAUST_DATA"],
    store="memory://",
    topic_partitions=2,
    web_enabled=False,
)
# Raw values on both topics: the test writes and reads plain bytes, not faust's JSON envelope.
source = app.topic(os.environ["FAUST_INPUT"], key_type=str, value_type=bytes, value_serializer="raw")
sink = app.topic(os.environ["FAUST_OUTPUT"], key_type=str, value_type=bytes, value_serializer="raw")
counts = app.Table("counts", default=int, partitions=2)


@app.agent(source)
async def count(stream):
    async for key, _value in stream.items():
        counts[key] += 1
        await sink.send(key=key, value=json.dumps({"key": key, "count": counts[key]}).encode())


if __name__ == "__main__":
    app.main()
