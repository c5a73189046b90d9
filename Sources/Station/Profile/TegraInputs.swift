/// What a `kind = "tegra"` profile gives the Tegra flasher: the SoC, NVIDIA's miniloader, the
/// BCT and the U-Boot to write, and the addresses to load it at. The firmware files are never
/// in the repository (NVIDIA's licence): the profile only names them. Paths are resolved
/// against the profile's directory; optional numbers left nil mean "the flasher's default for
/// this SoC".
public struct TegraInputs: Sendable, Equatable {
    /// `tegra20`, `tegra30`, `tegra114` or `tegra124`.
    public var soc: String
    /// USB product ids (vendor 0955) the board shows in recovery mode, e.g. `[0x7140]`.
    public var usbProductIDs: [UInt16]
    public var miniloader: String
    public var miniloaderEntry: UInt32?
    public var bct: String
    public var uboot: String
    public var ubootDTB: String?
    public var ubootBSSSize: UInt64?
    public var loadAddress: UInt32?
    public var ramBase: UInt32?
    /// Where the BCT and U-Boot go, e.g. `emmc`.
    public var bootDevice: String?
    /// Seconds after a board's job said "done" during which the same board (chip UID) showing up
    /// in recovery mode again is taken as "it did not boot", not flashed again: a board whose
    /// BCT cannot boot falls back to recovery, and flashing it again would loop. 0 turns the
    /// check off (every appearance is flashed). Default 600.
    public var cameBackWindow: Int?
    /// U-Boot environment variables set after `env default` (`[tegra.env]`).
    public var environment: [String: String]
    public var location: ConfigLocation

    public static let knownSoCs = ["tegra20", "tegra30", "tegra114", "tegra124"]
    static let keys = ["soc", "usb_product_ids", "miniloader", "miniloader_entry", "bct", "uboot",
                       "uboot_dtb", "uboot_bss_size", "load_address", "ram_base", "boot_device", "came_back_window", "env"]
    public static let defaultCameBackWindow = 600

    static func parse(_ reader: TOMLTableReader) throws -> TegraInputs {
        try reader.rejectUnknownKeys(keys)
        func required(_ key: String) throws -> String {
            guard let value = try reader.string(key) else {
                throw reader.error(key, "missing: a Tegra profile needs \(key) (a path relative to the profile)")
            }
            return reader.document.resolve(path: value)
        }
        func address(_ key: String) throws -> UInt32? {
            try reader.integer(key, in: 0...Int(UInt32.max)).map(UInt32.init)
        }
        guard let soc = try reader.string("soc") else {
            throw reader.error("soc", "missing: name the SoC, one of \(knownSoCs.joined(separator: ", "))")
        }
        guard knownSoCs.contains(soc) else {
            throw reader.error("soc", "unknown SoC \"\(soc)\"; known: \(knownSoCs.joined(separator: ", "))")
        }
        var productIDs: [UInt16] = []
        if let value = reader.value("usb_product_ids") {
            guard let array = value.array else {
                throw reader.mismatch("usb_product_ids", expected: "an array of integers like [0x7140]", found: value)
            }
            for (index, element) in array.enumerated() {
                guard let id = element.int, (0...0xFFFF).contains(id) else {
                    throw reader.document.error(at: reader.path("usb_product_ids") + [.index(index)],
                                                "expected a USB product id (0x0000…0xFFFF), found \(TOMLTableReader.describe(element))")
                }
                productIDs.append(UInt16(id))
            }
        }
        // U-Boot's BSS follows its image in the board's RAM, which a 32-bit SoC addresses
        // 4 GiB of in all.
        func ubootBSSSize() throws -> UInt64? {
            guard let size = try reader.byteSize("uboot_bss_size") else { return nil }
            guard size <= 1 << 30 else { throw reader.error("uboot_bss_size", "\(size) bytes cannot follow U-Boot in a 32-bit board's RAM (at most 1 GiB)") }
            return size
        }
        var environment: [String: String] = [:]
        if let env = try reader.table("env") {
            for key in env.table.keys {
                guard let value = try env.string(key) else { continue }
                environment[key] = value
            }
        }
        return TegraInputs(
            soc: soc, usbProductIDs: productIDs,
            miniloader: try required("miniloader"), miniloaderEntry: try address("miniloader_entry"),
            bct: try required("bct"), uboot: try required("uboot"),
            ubootDTB: try reader.string("uboot_dtb").map(reader.document.resolve(path:)),
            ubootBSSSize: try ubootBSSSize(),
            loadAddress: try address("load_address"), ramBase: try address("ram_base"),
            bootDevice: try reader.string("boot_device"),
            cameBackWindow: try reader.integer("came_back_window", in: 0...(7 * 86_400)), environment: environment,
            location: reader.document.location(of: reader.path))
    }
}
