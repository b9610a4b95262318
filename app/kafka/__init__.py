"""Everything that reaches below Faust's and aiokafka's public API lives in this package."""
