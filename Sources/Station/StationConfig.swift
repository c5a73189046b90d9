import Accounts
import BlockDevices
import Foundation
import ImageHTTP
import ImageIO
import TOMLKit

/// The station's configuration (`/etc/provision/station.toml`): which slots exist, which
/// profile each slot writes, and the station-wide limits. Errors name file, line and key.
///
/// ```toml
/// [station]
/// name = "bench-1"
/// allow_loop_devices = false      # tests and the demo set true
/// max_device_size = "512GiB"
/// ledger = "/var/lib/provision/ledger.sqlite"   # or a lab's shared ledger (issue 18):
/// # ledger = "postgresql://provision@db.lab:5432/provision"
/// # ledger_password_file = "/etc/provision/ledger.password"   # else ~/.pgpass
/// # ledger_local = "/var/lib/provision/ledger.sqlite"   # this station's copy and outbox
/// # ledger_unit_block = 32                             # unit numbers reserved ahead
/// admin_group = "provision-admin"
/// cache_dir = "/var/cache/provision"   # decompressed images shared by a batch
/// cache_limit = "16GiB"
/// profiles_dir = "/usr/share/provision/images"   # optional: */profile.toml found there
/// max_clients = 256               # control-socket connections; 8 more are kept for admins
/// buffer_budget = "48MiB"         # card buffers of all cards together (issue 18)
///
/// [profiles.demo]
/// image = "/srv/images/demo.img.zst"
/// verify = true
/// probe = true                  # capacity probe before writing (issue 16)
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
    /// The station's own SQLite ledger: the whole ledger by default; with a shared ledger,
    /// this station's copy of its rows and the outbox that feeds the database (`ledger_local`).
    public var ledgerPath: String
    /// The lab's shared ledger, when `ledger` is a postgresql:// URL (issue 18).
    public var lab: LabLedgerConfig?
    var labLocation: ConfigLocation?
    public var adminGroup: String
    public var inventoryPath: String?
    /// Decompressed images shared by the cards of a batch, and the most disk they may take.
    public var cacheDirectory: String
    public var cacheLimit: UInt64
    public var passwordExportPath: String?
    /// Control-socket connections served at once (admins get a few more, see the daemon);
    /// past it a client is refused with the reason. Kept well under the descriptor limit so
    /// that udev and the cards' jobs always find descriptors.
    public var maxClients: Int
    /// Seconds a control client may leave the daemon's replies unread before it is
    /// disconnected (its memory released): a client that reads at all drains a local socket
    /// in microseconds.
    public var unreadOutputTimeout: Int = 10
    /// Seconds a client may stay connected without a request (a watch is never idle).
    public var idleClientTimeout: Int = 60
    /// Bytes of buffers all cards together may hold (issue 18): one budget for the station,
    /// which cards draw on as their speed needs, not a fixed amount per card.
    public var bufferBudget = StationConfig.defaultBufferBudget
    /// 48 MiB: 32 cards at 1 MiB chunks need 40 MiB to make progress (a chunk written and a
    /// 256 KiB piece read back each); in `benchmarks/batch32.sh` 40 MiB already kept every card
    /// at its own speed, and 64 MiB only filled up with extras that bought nothing.
    public static let defaultBufferBudget = 48 << 20
    public var profiles: [String: Profile]
    public var slots: [Slot]
    /// Problems that do not stop the station: a profile of `profiles_dir` that no slot uses
    /// and whose files fail the checks (the tree names images built elsewhere). `config check`
    /// prints them, the daemon logs them at start and reload; only `provision flash --profile`
    /// could use such a profile.
    public var warnings: [ConfigError] = []
    /// Profiles that came from `profiles_dir` (not written in this file).
    var catalogProfiles: Set<String> = []
    /// Where `station.inventory` and `station.password_export` are written, for errors about
    /// the files they name.
    var inventoryLocation: ConfigLocation?
    var exportLocation: ConfigLocation?

    public static let defaultPath = "/etc/provision/station.toml"

    /// Reads, parses and checks a station config: everything `parse` checks, plus what the
    /// named files can tell (`checkFiles`). The daemon's start, its reload and
    /// `provision config check` all come through here, so they agree.
    /// Settings the daemon took at its start and keeps until it restarts: the station's name
    /// (its metrics and its rows in a shared ledger carry it), the ledger and its `ledger_*`
    /// keys, the image cache, and the admin group (the control socket's access). A reload puts
    /// the running values in place of changed ones here and returns the changed keys, so that
    /// status, metrics and the ledger never disagree on them.
    public mutating func keepStartSettings(of running: StationConfig) -> [String] {
        var kept: [String] = []
        if name != running.name { kept.append("name"); name = running.name }
        if ledgerPath != running.ledgerPath || lab != running.lab {
            kept.append(lab != nil || running.lab != nil ? "ledger (and ledger_*)" : "ledger")
            ledgerPath = running.ledgerPath
            lab = running.lab
            labLocation = running.labLocation
        }
        if cacheDirectory != running.cacheDirectory { kept.append("cache_dir"); cacheDirectory = running.cacheDirectory }
        if cacheLimit != running.cacheLimit { kept.append("cache_limit"); cacheLimit = running.cacheLimit }
        if adminGroup != running.adminGroup { kept.append("admin_group"); adminGroup = running.adminGroup }
        return kept
    }

    public static func load(file: String) throws -> StationConfig {
        var config = try parse(text: try readText(file), file: file)
        try config.checkFiles()
        return config
    }

    /// The file as UTF-8 text, or an error that says why not.
    static func readText(_ file: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: file) else {
            let why = FileManager.default.fileExists(atPath: file) ? "cannot read it (permissions?)" : "no such file"
            throw ConfigError(file: file, line: nil, keyPath: "", message: "cannot read the station config: \(why) (pass --config FILE)")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            var line = 1, column = 1, offset = 0
            var iterator = data.makeIterator()
            var decoder = UTF8()
            // Find the first byte that is not UTF-8, to say where it is.
            decoding: while true {
                switch decoder.decode(&iterator) {
                case .scalarValue(let scalar):
                    offset += UTF8.width(scalar)
                    if scalar == "\n" { line += 1; column = 1 } else { column += 1 }
                case .emptyInput, .error: break decoding
                }
            }
            throw ConfigError(file: file, line: line, column: column, keyPath: "",
                              message: "not UTF-8 text (an invalid byte at offset \(offset)): is this the right file?")
        }
        return text
    }

    /// Parses and checks the text, without reading the files it names.
    public static func parse(text: String, file: String) throws -> StationConfig {
        // An empty file would be a station with nothing to do: most likely a truncated write
        // or the wrong path, and a reload of it would drop every slot.
        guard !text.allSatisfy(\.isWhitespace) else {
            throw ConfigError(file: file, line: nil, keyPath: "", message: "the station config is empty; it needs at least [[slots]] and the profiles they use")
        }
        let base = (file as NSString).deletingLastPathComponent
        let (table, document) = try TOMLDocument.parse(text: text, source: file, baseDirectory: base.isEmpty ? "." : base)
        let root = TOMLTableReader(table: table, path: [], document: document)
        try root.rejectUnknownKeys(["station", "profiles", "slots"])

        let station = try root.table("station")
        try station?.rejectUnknownKeys(["name", "allow_loop_devices", "max_device_size", "ledger", "ledger_password_file", "ledger_local", "ledger_unit_block",
                                        "admin_group", "profiles_dir", "inventory", "password_export", "cache_dir", "cache_limit", "max_clients",
                                        "unread_output_timeout", "idle_client_timeout", "buffer_budget"])
        let ledger = try station?.string("ledger")
        var config = StationConfig(
            file: file,
            name: try station?.string("name") ?? (ProcessInfo.processInfo.hostName),
            allowLoopDevices: try station?.bool("allow_loop_devices") ?? false,
            maxDeviceSize: try station?.byteSize("max_device_size") ?? 512 << 30,
            ledgerPath: try Self.localLedgerPath(ledger: ledger, station, document),
            adminGroup: try station?.string("admin_group") ?? "provision-admin",
            inventoryPath: (try station?.string("inventory")).map { document.resolve(path: $0) },
            cacheDirectory: (try station?.string("cache_dir")).map { document.resolve(path: $0) } ?? "/var/cache/provision",
            cacheLimit: try station?.byteSize("cache_limit") ?? 16 << 30,
            passwordExportPath: (try station?.string("password_export")).map { document.resolve(path: $0) },
            maxClients: try station?.integer("max_clients", in: 1...(1 << 20)) ?? 256,
            profiles: [:], slots: [])
        config.unreadOutputTimeout = try station?.integer("unread_output_timeout", in: 1...3600) ?? 10
        config.idleClientTimeout = try station?.integer("idle_client_timeout", in: 1...86400) ?? 60
        if let station, let url = ledger, LabLedgerConfig.isURL(url) {
            do {
                config.lab = try LabLedgerConfig.parse(url: url, passwordFile: (try station.string("ledger_password_file")).map { document.resolve(path: $0) },
                                                       unitBlock: try station.integer("ledger_unit_block", in: 1...100_000) ?? 32)
            } catch let problem as LabConfigProblem {
                throw station.error("ledger", problem.message)
            }
            config.labLocation = document.location(of: station.path(station.contains("ledger_password_file") ? "ledger_password_file" : "ledger"))
        } else {
            for key in ["ledger_password_file", "ledger_local", "ledger_unit_block"] where station?.contains(key) == true {
                throw station!.error(key, "only for a shared ledger (ledger = \"postgresql://…\"); this station's ledger is its own SQLite file")
            }
        }
        if let budget = try station?.byteSize("buffer_budget") {
            // One 1 MiB chunk must fit, or no card could ever start; past 16 GiB it is a typo.
            guard budget >= 1 << 20, budget <= 16 << 30 else {
                throw station!.error("buffer_budget", "\(ByteCount.human(budget)) is out of range: give 1MiB to 16GiB (48MiB writes 32 cards at their own speed)")
            }
            config.bufferBudget = Int(budget)
        }
        config.inventoryLocation = station.map { document.location(of: $0.path("inventory")) }
        config.exportLocation = station.map { document.location(of: $0.path("password_export")) }
        if let name = try station?.string("name"), let bad = UserSpec.forbidden(in: name, also: []) {
            throw station!.error("name", "contains \(bad); the station's name is one plain line")
        }
        if let group = try station?.string("admin_group"), let bad = UserSpec.forbidden(in: group, also: [":", ",", " "]) {
            throw station!.error("admin_group", "contains \(bad); give the name of a group in /etc/group")
        }

        if let dir = try station?.string("profiles_dir") {
            let catalog = try ProfileCatalog.load(directory: document.resolve(path: dir))
            try catalog.requireNoProblems()
            config.profiles = catalog.profiles
            config.catalogProfiles = Set(catalog.profiles.keys)
        }
        if let profiles = try root.table("profiles") {
            for key in profiles.table.keys.sorted() {
                guard let sub = try profiles.table(key) else { continue }
                config.profiles[key] = try Profile.parse(inline: sub, name: key)
                config.catalogProfiles.remove(key)
            }
        }
        var seen: Set<String> = []
        for slot in try root.tables("slots") ?? [] {
            try slot.rejectUnknownKeys(["name", "match", "profile"])
            guard let name = try slot.string("name") else { throw slot.error("name", "every slot needs a name") }
            guard let match = try slot.string("match") else { throw slot.error("match", "slot \(name) needs match = \"<ID_PATH glob>\"") }
            guard let profile = try slot.string("profile") else { throw slot.error("profile", "slot \(name) needs a profile") }
            for (key, value) in [("name", name), ("match", match)] {
                if let bad = UserSpec.forbidden(in: value, also: []) {
                    throw slot.error(key, "contains \(bad); slot names and patterns are one plain line")
                }
                if value.isEmpty { throw slot.error(key, "is empty") }
            }
            guard config.profiles[profile] != nil else {
                let known = config.profiles.keys.sorted().joined(separator: ", ")
                throw slot.error("profile", "no profile named \"\(profile)\" (known: \(known.isEmpty ? "none" : known))")
            }
            guard seen.insert(name).inserted else { throw slot.error("name", "slot name \"\(name)\" is used twice") }
            config.slots.append(Slot(name: name, match: match, profile: profile))
        }
        // Cards are matched to slots; Tegra boards to tegra profiles by USB id. A config
        // with neither would start a daemon that never does anything.
        if config.slots.isEmpty, !config.profiles.values.contains(where: { $0.kind == .tegra }) {
            throw ConfigError(file: file, line: nil, keyPath: "slots",
                              message: "no [[slots]] (and no kind = \"tegra\" profile): the station would never write a card; add [[slots]] with name, match and profile")
        }
        try config.requirePasswordExport()
        return config
    }

    /// `ledger` when it is a file; `ledger_local` (or the default file) when `ledger` is shared.
    static func localLedgerPath(ledger: String?, _ station: TOMLTableReader?, _ document: TOMLDocument) throws -> String {
        if let ledger, !LabLedgerConfig.isURL(ledger) { return document.resolve(path: ledger) }
        return (try station?.string("ledger_local")).map { document.resolve(path: $0) } ?? "/var/lib/provision/ledger.sqlite"
    }

    /// The checks that read the files the config names: every profile a slot uses, every
    /// profile written in this file and every Tegra profile (boards pick those by USB id)
    /// must have its image, bmap, blobs and root partition right (`Profile.checkFiles`); the
    /// inventory must parse with every value valid. A profile of `profiles_dir` that no
    /// slot uses only warns.
    public mutating func checkFiles() throws {
        let used = Set(slots.map(\.profile))
        warnings = []
        // Profiles that must pass; the others only warn.
        func required(_ name: String) -> Bool {
            !catalogProfiles.contains(name) || used.contains(name) || profiles[name]?.kind == .tegra
        }
        var checked: [Profile] = []
        for name in profiles.keys.sorted() {
            let profile = profiles[name]!
            do {
                try profile.checkFiles()
                checked.append(profile)
            } catch let error as ConfigError where !required(name) {
                warnings.append(error)
            }
        }
        // Sizes that refuse every card: a slot's profile whose minimum is above the station's
        // maximum, or whose image is larger than any card the station accepts.
        for name in used.sorted() {
            guard let profile = profiles[name], let image = profile.image else { continue }
            if let minimum = image.minDeviceSize, minimum > maxDeviceSize {
                throw image.location.error("min_device_size \(ByteCount.human(minimum)) is above the station's max_device_size \(ByteCount.human(maxDeviceSize)): every card would be refused")
            }
            guard !HTTPImage.isURL(image.file) else { continue }
            let size = profile.bmapFile(image).flatMap { try? Bmap.load(path: $0).imageSize } ?? (try? ImageSource(path: image.file))?.uncompressedSizeHint
            if let size, size > maxDeviceSize {
                throw image.location.error("the image needs \(ByteCount.human(size)), more than the station's max_device_size \(ByteCount.human(maxDeviceSize)): every card would be refused")
            }
        }
        // The shared ledger's password file: missing, unreadable or readable by others is an
        // error here, not a surprise at the first card.
        if let lab {
            do { _ = try lab.password() } catch {
                throw (labLocation ?? ConfigLocation(file: file, line: nil, keyPath: "station.ledger")).error(error.message)
            }
        }
        var exportPath = passwordExportPath
        if let inventoryPath {
            do throws(AccountsError) {
                let inventory = try Inventory.load(path: inventoryPath)
                // The inventory's export wins over the station's (as the jobs do it).
                if let own = inventory.passwordExport {
                    exportPath = own
                    try PasswordExport(path: own).check()
                }
            } catch {
                let location = inventoryLocation ?? ConfigLocation(file: file, line: nil, keyPath: "station.inventory")
                throw location.error(error.message)
            }
        }
        if let exportPath, exportPath == passwordExportPath {
            do throws(AccountsError) { try PasswordExport(path: exportPath).check() } catch {
                throw (exportLocation ?? ConfigLocation(file: file, line: nil, keyPath: "station.password_export")).error(error.message)
            }
        }
        for profile in checked {
            do {
                try rehearseInjection(profile)
            } catch let error as ConfigError where !required(profile.name) {
                warnings.append(error)
            }
        }
    }

    /// For a raw image, the whole injection is rehearsed on the image file itself, read-only:
    /// groups the image lacks, a shell it does not have, a uid or name it already uses
    /// otherwise, a root filesystem too full — what only the image's /etc can tell. A
    /// compressed image would have to be decompressed up to its root filesystem's end, so
    /// there only the partition checks of `Profile.checkFiles` apply. The users are the
    /// profile's and the inventory's defaults (per-unit overrides are checked for form only).
    func rehearseInjection(_ profile: Profile) throws {
        guard profile.kind == .sd, profile.inject, let image = profile.image,
              (try? ImageSource(path: image.file))?.format == .raw,
              let plan = try UnitPlan.make(profile: profile, inventoryPath: inventoryPath, exportPath: passwordExportPath,
                                           serial: nil, slot: nil, sequence: 1)
        else { return }
        do throws(AccountsError) {
            try Injector.rehearse(target: image.file, root: plan.root, users: plan.users, hashMethod: plan.hashMethod)
        } catch {
            // The injector's messages name the user; point at that user's table when it is the
            // profile's (an inventory user has no line here), else at the root partition.
            let user = profile.users.first { error.message.contains("user \($0.name)") || error.message.contains("\($0.name) ") }
            let location = user?.location ?? profile.root?.location ?? profile.location
            throw location.error("injection into \(image.file) would fail: \(error.message)")
        }
    }

    /// The slot a device belongs to: the first whose glob matches its slot path.
    public func slot(forSlotPath path: String?) -> Slot? {
        guard let path else { return nil }
        return slots.first { fnmatch($0.match, path, 0) == 0 }
    }
}
