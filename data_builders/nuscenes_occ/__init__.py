"""TFDS builder of nuScenes key frames with CAN bus, Occ3D and UniScene occupancy labels."""
