"""Everything that knows about ranks: process groups, sharding plans, DMP."""
