"""One loader per dataset family: the peers' graph cities, CityView, multi-modal folders, built folders, rasters."""
