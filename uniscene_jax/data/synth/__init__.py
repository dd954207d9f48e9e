"""The embedded synthetic world: one geometric scene per nuScenes scene, observed by every sensor.

`world` lays out the scene (road, buildings, vegetation, tracked objects), `raycast` intersects rays
with it, `sensors` turns that into lidar scans and camera images, `occ3d` voxelises it, `canbus`
writes the vehicle signals and `tables` the nuScenes records. `uniscene_jax.data.synthetic_world`
puts them together on disk.
"""
