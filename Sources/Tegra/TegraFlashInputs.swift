import Foundation

/// Everything the flasher needs, loaded into memory (a few hundred KiB).
public struct TegraFlashInputs: Sendable {
    public var chip: TegraChip
    /// Product ids the profile accepts (e.g. 0x7140, 0x7740); empty means any of the chip.
    public var usbProductIDs: [UInt16]
    public var miniloader: [UInt8]
    public var miniloaderEntry: UInt32
    /// The profile's `bct` file: either the raw BCT (`cbootimage -gbct`; provision completes it for
    /// this U-Boot) or a whole boot image cbootimage made (provision checks that it describes this U-Boot).
    public var bct: [UInt8]
    public var ubootNoDTB: [UInt8]
    public var ubootDTB: [UInt8]
    /// Only for messages (the DTB file's name).
    public var ubootDTBName: String
    public var ubootBSSSize: Int
    /// Where the bootloader is loaded and started: the U-Boot SPL entry (0x80108000 for mainline).
    public var loadAddress: UInt32
    public var ramBase: UInt32
    public var bootDevice: String
    /// Per-unit `setenv` templates, in order; `{unit}` and `{uid}` are substituted by the flasher.
    public var environment: [(name: String, value: String)]
    /// The unit's name for `{unit}`; when nil the chip UID is used.
    public var unitName: String?

    public init(chip: TegraChip, usbProductIDs: [UInt16] = [], miniloader: [UInt8], miniloaderEntry: UInt32,
                bct: [UInt8], ubootNoDTB: [UInt8], ubootDTB: [UInt8], ubootDTBName: String = "u-boot.dtb",
                ubootBSSSize: Int, loadAddress: UInt32, ramBase: UInt32, bootDevice: String = "emmc",
                environment: [(name: String, value: String)] = [], unitName: String? = nil) {
        self.chip = chip
        self.usbProductIDs = usbProductIDs
        self.miniloader = miniloader
        self.miniloaderEntry = miniloaderEntry
        self.bct = bct
        self.ubootNoDTB = ubootNoDTB
        self.ubootDTB = ubootDTB
        self.ubootDTBName = ubootDTBName
        self.ubootBSSSize = ubootBSSSize
        self.loadAddress = loadAddress
        self.ramBase = ramBase
        self.bootDevice = bootDevice
        self.environment = environment
        self.unitName = unitName
    }

    /// The U-Boot the board keeps running after the flash: nodtb + its unedited DTB.
    public var flashedUBoot: [UInt8] { ubootNoDTB + ubootDTB }

    /// The BCT the miniloader gets over USB (it initialises SDRAM from it): the raw file, or the
    /// first copy inside a cbootimage image.
    public var usbBCT: [UInt8] {
        guard let layout = BCTLayout.detect(bct), bct.count > layout.size else { return bct }
        return Array(bct[0..<layout.size])
    }

    /// What goes to eMMC boot0: the raw BCT completed for `flashedUBoot` as cbootimage does, or the
    /// given cbootimage image after checking it describes `flashedUBoot` at the load address.
    public func bootImage() throws -> TegraBootImage {
        if let layout = BCTLayout.detect(bct), bct.count > layout.size {
            return try TegraBootImage.check(image: bct, uboot: flashedUBoot, loadAddress: loadAddress, entryPoint: loadAddress,
                                            chip: chip, name: "the profile's boot image (bct)")
        }
        return try TegraBootImage.build(bct: bct, uboot: flashedUBoot, loadAddress: loadAddress, entryPoint: loadAddress, chip: chip)
    }

    /// The environment with `{unit}` and `{uid}` filled in.
    public func substitutedEnvironment(uid: String) -> [(name: String, value: String)] {
        environment.map { entry in
            (entry.name, entry.value.replacingOccurrences(of: "{unit}", with: unitName ?? uid)
                .replacingOccurrences(of: "{uid}", with: uid))
        }
    }
}

/// A `[tegra]` profile table with file names, before the files are read.
/// Relative paths are resolved against `baseDirectory` (the profile's directory).
public struct TegraProfile: Sendable {
    public var soc: String
    public var usbProductIDs: [UInt16]
    public var miniloader: String
    public var miniloaderEntry: UInt32?
    public var bct: String
    public var uboot: String
    public var ubootDTB: String
    public var ubootBSSSize: Int
    public var loadAddress: UInt32
    public var ramBase: UInt32
    public var bootDevice: String
    public var environment: [(name: String, value: String)]
    public var baseDirectory: String

    public init(soc: String, usbProductIDs: [UInt16], miniloader: String, miniloaderEntry: UInt32?, bct: String,
                uboot: String, ubootDTB: String, ubootBSSSize: Int, loadAddress: UInt32, ramBase: UInt32,
                bootDevice: String, environment: [(name: String, value: String)], baseDirectory: String) {
        self.soc = soc
        self.usbProductIDs = usbProductIDs
        self.miniloader = miniloader
        self.miniloaderEntry = miniloaderEntry
        self.bct = bct
        self.uboot = uboot
        self.ubootDTB = ubootDTB
        self.ubootBSSSize = ubootBSSSize
        self.loadAddress = loadAddress
        self.ramBase = ramBase
        self.bootDevice = bootDevice
        self.environment = environment
        self.baseDirectory = baseDirectory
    }

    /// Reads every file; a missing one is an error naming it and where it comes from.
    public func loadInputs(unitName: String? = nil) throws -> TegraFlashInputs {
        guard let chip = TegraChip(socName: soc) else {
            throw TegraError(.invalidInput, "profile: soc \"\(soc)\" is not one of tegra20, tegra30, tegra114, tegra124")
        }
        guard bootDevice.lowercased() == "emmc" else {
            throw TegraError(.invalidInput, "profile: boot_device \"\(bootDevice)\" is not supported (only emmc)")
        }
        for id in usbProductIDs where TegraChip(productID: id) != chip {
            throw TegraError(.invalidInput, "profile: usb_product_id 0x\(String(id, radix: 16)) is not a \(chip) recovery id")
        }
        let miniloaderBytes = try read(miniloader, key: "miniloader",
            origin: "NVIDIA's miniloader for \(soc), from the L4T package or the tegrarcm source (\(soc)-miniloader), redistributable only unmodified with its licence")
        let bctBytes = try read(bct, key: "bct",
            origin: "the board's BCT, built by cbootimage from cbootimage-configs (tegra124/nvidia/jetson-tk1) or shipped in tegra-uboot-flasher-scripts")
        let ubootBytes = try read(uboot, key: "uboot",
            origin: "u-boot-nodtb-tegra.bin from a U-Boot build (make jetson-tk1_defconfig && make)")
        let dtbBytes = try read(ubootDTB, key: "uboot_dtb",
            origin: "u-boot.dtb from the same U-Boot build")
        let inputs = TegraFlashInputs(chip: chip, usbProductIDs: usbProductIDs, miniloader: miniloaderBytes,
                                miniloaderEntry: miniloaderEntry ?? chip.miniloaderEntry, bct: bctBytes,
                                ubootNoDTB: ubootBytes, ubootDTB: dtbBytes,
                                ubootDTBName: resolve(ubootDTB), ubootBSSSize: ubootBSSSize,
                                loadAddress: loadAddress, ramBase: ramBase, bootDevice: bootDevice,
                                environment: environment, unitName: unitName)
        // A BCT that cannot make a bootable image is found here, before the board is touched.
        do {
            _ = try inputs.bootImage()
        } catch let error as TegraError {
            throw TegraError(error.kind, "\(resolve(bct)) (profile key bct): \(error.message)")
        }
        // And the flasher's payload: the DTB, the environment, the address space.
        try FlasherPayload.check(inputs)
        return inputs
    }

    public func resolve(_ path: String) -> String {
        path.hasPrefix("/") ? path : (baseDirectory as NSString).appendingPathComponent(path)
    }

    private func read(_ path: String, key: String, origin: String) throws -> [UInt8] {
        let full = resolve(path)
        guard FileManager.default.fileExists(atPath: full) else {
            throw TegraError(.missingInput, "missing input \(full) (profile key \(key)): provide \(origin)")
        }
        guard let data = FileManager.default.contents(atPath: full) else {
            throw TegraError(.missingInput, "cannot read \(full) (profile key \(key)): check its permissions")
        }
        guard !data.isEmpty else {
            throw TegraError(.invalidInput, "\(full) (profile key \(key)) is empty: provide \(origin)")
        }
        return [UInt8](data)
    }
}
