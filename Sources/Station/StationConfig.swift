import Foundation
import TOMLKit

/// The station's configuration (`/etc/provision/station.toml`): which slots exist, which
/// profile each slot writes, and the station-wide limits. Errors name file, line and key.
///
/// ```toml
/// [station]
/// name = "bench-1"
/// allow_loop_devices = false      # tests and the demo set true
/// max_device_size = "512GiB"
/// ledger = "/var/lib/provision/ledger.sqlite"
/// admin_group = "provision-admin"
/// cache_dir = "/var/cache/provision"   # decompressed images shared by a batch
/// cache_limit = "16GiB"
/// profiles_dir = "/usr/share/provision/images"   # optional: */profile.toml found there
///
/// [profiles.demo]
/// image = "/srv/images/demo.img.zst"
/// verify = true
///
/// [[slots]]
/// name = "A1"
/// match = "pci-0000:00:14.0-usb-0:1.1:1.0-scsi-0:0:0:0"   # udev ID_PATH glob
/// profile = "demo"
/// ```
public struct StationConfig: Sendable {
    public struct Slot: Sendable, Equatable {
        public var name: String
        /// A glob (fnmatch) over the device's slot path: udev ID_PATH, or `loop:<backing file>`.
        public var match: String
        public var profile: String
    }

    public var file: String
    public var name: String
    public var allowLoopDevices: Bool
    public var maxDeviceSize: UInt64
    public var ledgerPath: String
    public var adminGroup: String
    public var inventoryPath: String?
    /// Decompressed images shared by the cards of a batch, and the most disk they may take.
    public var cacheDirectory: String
    public var cacheLimit: UInt64
    public var passwordExportPath: String?
    public var profiles: [String: Profile]
    public var slots: [Slot]

    public static let defaultPath = "/etc/provision/station.toml"

    public static func load(file: String) throws -> StationConfig {
        guard let data = FileManager.default.contents(atPath: file), let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(file: file, line: nil, keyPath: "", message: "cannot read the station config (does it exist? pass --config FILE)")
        }
        return try parse(text: text, file: file)
    }

    public static func parse(text: String, file: String) throws -> StationConfig {
        let base = (file as NSString).deletingLastPathComponent
        let (table, document) = try TOMLDocument.parse(text: text, source: file, baseDirectory: base.isEmpty ? "." : base)
        let root = TOMLTableReader(table: table, path: [], document: document)
        try root.rejectUnknownKeys(["station", "profiles", "slots"])

        let station = try root.table("station")
        try station?.rejectUnknownKeys(["name", "allow_loop_devices", "max_device_size", "ledger", "admin_group", "profiles_dir", "inventory", "password_export", "cache_dir", "cache_limit"])
        var config = StationConfig(
            file: file,
            name: try station?.string("name") ?? (ProcessInfo.processInfo.hostName),
            allowLoopDevices: try station?.bool("allow_loop_devices") ?? false,
            maxDeviceSize: try station?.byteSize("max_device_size") ?? 512 << 30,
            ledgerPath: (try station?.string("ledger")).map { document.resolve(path: $0) } ?? "/var/lib/provision/ledger.sqlite",
            adminGroup: try station?.string("admin_group") ?? "provision-admin",
            inventoryPath: (try station?.string("inventory")).map { document.resolve(path: $0) },
            cacheDirectory: (try station?.string("cache_dir")).map { document.resolve(path: $0) } ?? "/var/cache/provision",
            cacheLimit: try station?.byteSize("cache_limit") ?? 16 << 30,
            passwordExportPath: (try station?.string("password_export")).map { document.resolve(path: $0) },
            profiles: [:], slots: [])

        if let dir = try station?.string("profiles_dir") {
            let catalog = try ProfileCatalog.load(directory: document.resolve(path: dir))
            try catalog.requireNoProblems()
            config.profiles = catalog.profiles
        }
        if let profiles = try root.table("profiles") {
            for key in profiles.table.keys.sorted() {
                guard let sub = try profiles.table(key) else { continue }
                config.profiles[key] = try Profile.parse(inline: sub, name: key)
            }
        }
        var seen: Set<String> = []
        for slot in try root.tables("slots") ?? [] {
            try slot.rejectUnknownKeys(["name", "match", "profile"])
            guard let name = try slot.string("name") else { throw slot.error("name", "every slot needs a name") }
            guard let match = try slot.string("match") else { throw slot.error("match", "slot \(name) needs match = \"<ID_PATH glob>\"") }
            guard let profile = try slot.string("profile") else { throw slot.error("profile", "slot \(name) needs a profile") }
            guard config.profiles[profile] != nil else {
                let known = config.profiles.keys.sorted().joined(separator: ", ")
                throw slot.error("profile", "no profile named \"\(profile)\" (known: \(known.isEmpty ? "none" : known))")
            }
            guard seen.insert(name).inserted else { throw slot.error("name", "slot name \"\(name)\" is used twice") }
            config.slots.append(Slot(name: name, match: match, profile: profile))
        }
        try config.requirePasswordExport()
        return config
    }

    /// The slot a device belongs to: the first whose glob matches its slot path.
    public func slot(forSlotPath path: String?) -> Slot? {
        guard let path else { return nil }
        return slots.first { fnmatch($0.match, path, 0) == 0 }
    }
}
