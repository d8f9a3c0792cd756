"""A quixstreams application used by test_streams.py: counts records per key with a state store.

Run as `python streams_count_app.py BOOTSTRAP INPUT OUTPUT GROUP STATE_DIR COUNT GUARANTEE`. It
processes COUNT records (or stops after 20 s without a new one), writing `{"key", "count"}` to OUTPUT
for each. The state store's changelog is a compacted topic the application creates on the broker,
so a restarted application recovers its counts from the broker, not from local disk.
"""
import sys

from quixstreams import Application


def main():
    bootstrap, input_topic, output_topic, group, state_dir, count, guarantee = sys.argv[1:8]
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        processing_guarantee=guarantee,
        # Small commit interval so a clean stop after COUNT outputs has committed them.
        commit_interval=0.5,
    )
    source = app.topic(input_topic, value_deserializer="json")
    sink = app.topic(output_topic, value_serializer="json")
    frame = app.dataframe(source)

    def count_per_key(value, state):
        total = state.get("count", 0) + 1
        state.set("count", total)
        return {"key": value["key"], "count": total}

    frame = frame.apply(count_per_key, stateful=True)
    frame.to_topic(sink)
    app.run(count=int(count), timeout=20)


if __name__ == "__main__":
    main()
