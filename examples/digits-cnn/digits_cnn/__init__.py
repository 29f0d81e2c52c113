"""A user's own model package: meshctl imports it from beside mesh.yaml and pins its code by hash."""
