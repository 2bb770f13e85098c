"""The studies of ssld on real data, and the driver and step builders they share."""
