// BlockDevicesTests
