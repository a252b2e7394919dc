//! Types of Skiff's REST API (the Incus/LXD /1.0 shapes), shared by skiffd, the skiff CLI and tests
