"""Device settings read from a Flower node config (``--node-config "store-path='...'"``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from attune.client.policy import PrivacyConfig
from attune.client.ranking import RANKINGS
from attune.shared.errors import ConfigError
from attune.shared.vocabulary import Vocabulary

if TYPE_CHECKING:
    from attune.client.personalizer import Personalizer
    from attune.shared.wire import RoundRequest

NODE_CONFIG_KEYS = frozenset({"store-path", "epsilon-budget", "delta", "min-noise-multiplier", "allow-non-private",
                              "allow-evaluation",
                              "vocabulary-path", "encryption-key-file", "coordinator-public-key",
                              "allow-unsigned", "partition-id", "num-partitions", "ranking"})


@dataclass(frozen=True)
class DeviceSettings:
    """Where the device keeps its store, its own privacy limits, and whom it trusts.

    The device adopts only global models signed by the key in ``coordinator_public_key``;
    ``allow_unsigned`` (for local experiments only) lets it run without one.
    """

    store_path: Path
    privacy: PrivacyConfig
    vocabulary_path: Path | None = None
    simulation_seed: tuple[int, int] | None = None  # (run seed, device): simulations only
    encryption_key_file: Path | None = None
    coordinator_public_key: Path | None = None
    allow_unsigned: bool = False
    ranking: str = "partial-local"  # what the device fits for its person's ranking (attune.client.ranking)
    # simulations only: the simulator playing the app just before a verified round (it records the
    # held-out event of an evaluation round, as a person's app records what they used)
    before_round: Callable[[Personalizer, RoundRequest], None] | None = None

    def encryption_key(self) -> bytes | None:
        """The store's key from ``encryption-key-file`` (64 hex digits), read when opening."""
        if self.encryption_key_file is None:
            return None
        try:
            return bytes.fromhex(self.encryption_key_file.read_text().strip())
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read the store key from {self.encryption_key_file}: {error}") from None

    def read_vocabulary(self) -> Vocabulary | None:
        """The catalog of ``vocabulary-path`` (a JSON list of item ids), or ``None`` without one."""
        if self.vocabulary_path is None:
            return None
        try:
            ids = json.loads(Path(self.vocabulary_path).read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"vocabulary-path: cannot read {self.vocabulary_path} as JSON: {error}") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ConfigError(f"vocabulary-path: {self.vocabulary_path} must hold a JSON list of item ids")
        return Vocabulary.of(ids)

    def check(self) -> list[str]:
        """Open what the settings name as a round would (the store with its key, the vocabulary,
        the coordinator's public key) and say what was found; ``AttuneError`` naming the node
        config key otherwise. For ``attune check-node`` before a SuperNode starts: Flower runs
        the ClientApp only when a round arrives."""
        from attune.client.store import EventStore
        from attune.shared.signing import load_public_key

        found = []
        key = self.encryption_key()
        if self.store_path.exists():
            with EventStore(self.store_path, key=key) as store:
                found.append(f"store-path: {self.store_path} ({store.count()} events, "
                             f"{'encrypted' if store.encrypted else 'not encrypted'}, {len(store.ledger())} rounds "
                             "paid)")
        elif not self.store_path.parent.is_dir() or not os.access(self.store_path.parent, os.W_OK):
            raise ConfigError(f"store-path: {self.store_path.parent} is not a folder this process can write")
        else:
            found.append(f"store-path: {self.store_path} (no store yet: the app or the first round creates it)")
        vocabulary = self.read_vocabulary()
        if vocabulary is not None:
            found.append(f"vocabulary-path: {vocabulary.num_items} item ids")
        if self.coordinator_public_key is not None:
            load_public_key(self.coordinator_public_key)
            found.append(f"coordinator-public-key: {self.coordinator_public_key} (Ed25519)")
        elif not self.allow_unsigned:
            raise ConfigError("coordinator-public-key is missing: this device would refuse every round (set "
                              "allow-unsigned=true only for local experiments)")
        found.append(f"privacy: epsilon budget {self.privacy.epsilon_budget} (the store's may be lower), delta "
                     f"{self.privacy.delta}, noise floor {self.privacy.min_noise_multiplier}, evaluation rounds "
                     f"{'joined' if self.privacy.allow_evaluation else 'refused'}")
        return found

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> DeviceSettings:
        unknown = set(node_config) - NODE_CONFIG_KEYS
        if unknown:
            raise ConfigError(f"unknown node config key(s) {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(NODE_CONFIG_KEYS))}")
        if "store-path" not in node_config:
            raise ConfigError("node config needs 'store-path': the device's event store file")
        defaults = PrivacyConfig()
        privacy = PrivacyConfig(
            epsilon_budget=node_config.get("epsilon-budget", defaults.epsilon_budget),  # type: ignore[arg-type]
            delta=node_config.get("delta", defaults.delta),  # type: ignore[arg-type]
            min_noise_multiplier=node_config.get("min-noise-multiplier",  # type: ignore[arg-type]
                                                 defaults.min_noise_multiplier),
            allow_non_private=node_config.get("allow-non-private", False),  # type: ignore[arg-type]
            allow_evaluation=node_config.get("allow-evaluation", True),  # type: ignore[arg-type]
        )
        allow_unsigned = node_config.get("allow-unsigned", False)
        if not isinstance(allow_unsigned, bool):
            raise ConfigError(f"allow-unsigned must be true or false, got {allow_unsigned!r}")
        ranking = node_config.get("ranking", "partial-local")
        if ranking not in RANKINGS:
            raise ConfigError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
        vocabulary = node_config.get("vocabulary-path")
        key_file = node_config.get("encryption-key-file")
        public_key = node_config.get("coordinator-public-key")
        return cls(
            store_path=Path(str(node_config["store-path"])),
            privacy=privacy,
            vocabulary_path=Path(str(vocabulary)) if vocabulary else None,
            encryption_key_file=Path(str(key_file)) if key_file else None,
            coordinator_public_key=Path(str(public_key)) if public_key else None,
            allow_unsigned=allow_unsigned,
            ranking=str(ranking),
        )
