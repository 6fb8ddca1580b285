"""`kvpilot router`: the tenant-facing, torch-free front door in front of `kvpilot serve` replicas."""
