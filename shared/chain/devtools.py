"""The local Ethereum toolchain: solcjs and Anvil from the project's own `.tools/` (installed by
`make tools`), compiling our Solidity test doubles, and deploying them with web3.

For tests, demos and `payments devchain`; the api and workers never import it.

    from shared.chain import devtools

    compiled = devtools.compile_solidity(devtools.solidity_source("BondingManagerPoolDouble"))
    with devtools.Anvil() as anvil:               # 127.0.0.1, a free port, chain id 31337
        w3 = devtools.connect(anvil.rpc_url)
        owner = anvil.accounts[0]                 # deterministic and funded
        pool = devtools.deploy_contract(w3, compiled, owner)
        devtools.transact(w3, owner, pool.functions.setPool([...]))

Nothing here downloads anything (our machines have no internet): a missing tool fails at once
with a message that names `make tools`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple

from eth_account import Account
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.types import TxParams, TxReceipt, Wei

from shared.embedded_nats import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SOLIDITY_DIR = PROJECT_ROOT / "contracts" / "solidity"
TOOLS_DIRNAME = ".tools"
SOLCJS_RELPATH = Path("node_modules/solc/solc.js")
ANVIL_RELPATH = Path("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
INSTALL_HINT = "run `make tools` in the project root (npm installs solc and anvil under .tools/)"

SOLC_TIMEOUT_S = 120.0

ANVIL_HOST = "127.0.0.1"
ANVIL_READY_TIMEOUT_S = 20.0
ANVIL_READY_POLL_S = 0.05
ANVIL_PROBE_TIMEOUT_S = 1.0
ANVIL_STOP_TIMEOUT_S = 10.0
ANVIL_SIGNAL_TIMEOUT_S = 5.0
# A free port can be taken between choosing it and Anvil binding it; try a fresh one.
ANVIL_START_ATTEMPTS = 3
LOG_TAIL_BYTES = 3000

RPC_TIMEOUT_S = 10.0
RECEIPT_TIMEOUT_S = 30.0
RECEIPT_POLL_S = 0.05

# Anvil's own defaults, passed explicitly so the accounts never depend on the Anvil version.
DEFAULT_CHAIN_ID = 31337
DEFAULT_MNEMONIC = "test test test test test test test test test test test junk"
DEFAULT_ACCOUNT_COUNT = 10
DEFAULT_BALANCE_ETH = 10_000
HD_PATH_TEMPLATE = "m/44'/60'/0'/0/{index}"


class ToolMissing(RuntimeError):
    """solcjs, anvil or node is not installed where the project expects it."""


class CompileError(RuntimeError):
    """solcjs rejected a source, or did not produce the contract asked for."""


class AnvilError(RuntimeError):
    """Anvil did not start, or answered a JSON-RPC call with an error."""


class TransactionFailed(RuntimeError):
    """A mined transaction has status 0, or a deployment left no code behind."""


# -- locating the tools ---------------------------------------------------------------------


def tools_dir(project_root: Path = PROJECT_ROOT) -> Path:
    return project_root / TOOLS_DIRNAME


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ToolMissing(f"{what} not found at {path}: {INSTALL_HINT}")
    return path


def solcjs_path(project_root: Path = PROJECT_ROOT) -> Path:
    """npm `solc`'s command-line script (run with node)."""
    return _require_file(tools_dir(project_root) / SOLCJS_RELPATH, "solcjs (npm solc)")


def anvil_path(project_root: Path = PROJECT_ROOT) -> Path:
    """The anvil binary shipped inside npm `@foundry-rs/anvil-linux-amd64`."""
    path = _require_file(tools_dir(project_root) / ANVIL_RELPATH, "anvil")
    if not os.access(path, os.X_OK):
        raise ToolMissing(f"anvil at {path} is not executable: {INSTALL_HINT}")
    return path


def node_binary() -> str:
    found = shutil.which("node")
    if found is None:
        raise ToolMissing(f"node not found on PATH; solcjs needs Node.js: {INSTALL_HINT}")
    return found


# -- compiling --------------------------------------------------------------------------------


class CompiledContract(NamedTuple):
    abi: list[dict[str, Any]]
    bytecode: str  # creation code, 0x-prefixed


def solidity_source(name: str) -> Path:
    """`contracts/solidity/<name>.sol`."""
    path = SOLIDITY_DIR / f"{name}.sol"
    if not path.is_file():
        raise FileNotFoundError(f"no Solidity source {path}")
    return path


def compile_solidity(
    source: Path,
    contract: str | None = None,
    *,
    optimize: bool = True,
    project_root: Path = PROJECT_ROOT,
) -> CompiledContract:
    """Compile `source` with solcjs (`--abi --bin`) and return `contract` (default: the file's
    stem). Imports resolve relative to the source's folder."""
    source = source.resolve()
    name = contract or source.stem
    command = [node_binary(), str(solcjs_path(project_root)), "--abi", "--bin", "--base-path", "."]
    if optimize:
        command.append("--optimize")
    with tempfile.TemporaryDirectory(prefix="solcjs-") as out:
        _run_solcjs([*command, "--output-dir", out, source.name], source)
        return _read_artifacts(Path(out), source, name)


def _run_solcjs(command: list[str], source: Path) -> None:
    try:
        result = subprocess.run(
            command,
            cwd=source.parent,
            capture_output=True,
            text=True,
            timeout=SOLC_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise CompileError(f"solcjs did not finish {source.name} in {SOLC_TIMEOUT_S}s") from error
    if result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}".strip()
        raise CompileError(f"solcjs failed on {source.name}:\n{output}")


def _read_artifacts(out: Path, source: Path, name: str) -> CompiledContract:
    # solcjs names outputs "<file with [:./] as _>_<contract>", e.g. "Pool_sol_Pool.bin".
    stem = f"{source.stem}_sol_{name}"
    abi_file, bin_file = out / f"{stem}.abi", out / f"{stem}.bin"
    if not (abi_file.is_file() and bin_file.is_file()):
        found = sorted(path.stem for path in out.glob("*.bin"))
        raise CompileError(f"solcjs produced no {name!r} from {source.name}; it produced {found}")
    bytecode = bin_file.read_text().strip()
    if not bytecode:
        raise CompileError(f"{name!r} in {source.name} has no bytecode (abstract or interface?)")
    return CompiledContract(abi=json.loads(abi_file.read_text()), bytecode="0x" + bytecode)


# -- Anvil ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevAccount:
    address: ChecksumAddress
    private_key: str  # 0x-prefixed hex


@cache
def dev_accounts(
    mnemonic: str = DEFAULT_MNEMONIC, count: int = DEFAULT_ACCOUNT_COUNT
) -> tuple[DevAccount, ...]:
    """The accounts Anvil funds for `mnemonic`, in Anvil's order (its default HD path)."""
    Account.enable_unaudited_hdwallet_features()
    accounts = []
    for index in range(count):
        local = Account.from_mnemonic(mnemonic, account_path=HD_PATH_TEMPLATE.format(index=index))
        accounts.append(DevAccount(address=local.address, private_key="0x" + local.key.hex()))
    return tuple(accounts)


def rpc_request(
    url: str, method: str, params: Sequence[Any] = (), timeout_s: float = RPC_TIMEOUT_S
) -> Any:
    """One raw JSON-RPC call (for readiness probes and Anvil's own methods such as evm_mine)."""
    payload = {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        body = json.loads(answer.read())
    if "error" in body:
        raise AnvilError(f"{method} failed: {body['error']}")
    return body["result"]


def _process_stopped(pid: int) -> bool:
    """Whether a (Linux) process is in the stopped state 'T'."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


class Anvil:
    """An Anvil node on 127.0.0.1 with deterministic, funded accounts.

    `start()` returns once `eth_chainId` answers with the configured chain id; `stop()` ends
    the process (the port is kept, so `rpc_url` then points at a dead node, which tests use);
    `pause()`/`resume()` freeze and thaw it. Also a context manager.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        chain_id: int = DEFAULT_CHAIN_ID,
        mnemonic: str = DEFAULT_MNEMONIC,
        account_count: int = DEFAULT_ACCOUNT_COUNT,
        balance_eth: int = DEFAULT_BALANCE_ETH,
        block_time_s: float | None = None,
        extra_args: Sequence[str] = (),
        log_file: Path | None = None,
        project_root: Path = PROJECT_ROOT,
    ) -> None:
        self.chain_id = chain_id
        self.mnemonic = mnemonic
        self.account_count = account_count
        self.balance_eth = balance_eth
        self.block_time_s = block_time_s
        self.extra_args = list(extra_args)
        self.log_file = log_file
        self.project_root = project_root
        self._requested_port = port
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def rpc_url(self) -> str:
        if self.port is None:
            raise AnvilError("anvil has not been started")
        return f"http://{ANVIL_HOST}:{self.port}"

    @property
    def accounts(self) -> tuple[DevAccount, ...]:
        return dev_accounts(self.mnemonic, self.account_count)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Anvil:
        if self.running():
            raise AnvilError(f"anvil is already running at {self.rpc_url}")
        binary = anvil_path(self.project_root)
        attempts = 1 if self._requested_port else ANVIL_START_ATTEMPTS
        reason = ""
        for _ in range(attempts):
            port = self._requested_port or free_port()
            self._spawn(binary, port)
            if self._wait_ready(port):
                self.port = port
                return self
            reason = self._log_tail()
            self.stop()
        raise AnvilError(f"anvil exited during start-up ({attempts} attempts):\n{reason}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused process would hold SIGTERM pending
            process.terminate()
            try:
                process.wait(ANVIL_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections are still accepted, nothing answers, as
        with a hung RPC provider. `resume()` (or `stop()`) ends the freeze. Returns once the
        process is stopped (signals are delivered asynchronously)."""
        self._signal(signal.SIGSTOP, stopped=True)

    def resume(self) -> None:
        self._signal(signal.SIGCONT, stopped=False)

    def _signal(self, number: signal.Signals, *, stopped: bool) -> None:
        if not self.running():
            raise AnvilError("anvil is not running")
        assert self._process is not None
        self._process.send_signal(number)
        deadline = time.monotonic() + ANVIL_SIGNAL_TIMEOUT_S
        while _process_stopped(self._process.pid) != stopped:
            if time.monotonic() > deadline:
                raise AnvilError(f"anvil did not react to {number.name}")
            time.sleep(ANVIL_READY_POLL_S)

    def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        return rpc_request(self.rpc_url, method, params)

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _argv(self, binary: Path, port: int) -> list[str]:
        argv = [
            str(binary),
            *("--host", ANVIL_HOST),
            *("--port", str(port)),
            *("--chain-id", str(self.chain_id)),
            *("--mnemonic", self.mnemonic),
            *("--accounts", str(self.account_count)),
            *("--balance", str(self.balance_eth)),
        ]
        if self.block_time_s is not None:
            argv += ["--block-time", str(self.block_time_s)]
        return argv + self.extra_args

    def _spawn(self, binary: Path, port: int) -> None:
        # An unnamed temporary file unless a log file is given: start-up errors can still be read.
        self._log = open(self.log_file, "ab+") if self.log_file else tempfile.TemporaryFile()  # noqa: SIM115
        self._process = subprocess.Popen(
            self._argv(binary, port), stdout=self._log, stderr=subprocess.STDOUT
        )

    def _wait_ready(self, port: int) -> bool:
        """True once Anvil answers; False if it exited (port taken); raises on timeout."""
        url = f"http://{ANVIL_HOST}:{port}"
        deadline = time.monotonic() + ANVIL_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running():
                return False
            try:
                answer = rpc_request(url, "eth_chainId", timeout_s=ANVIL_PROBE_TIMEOUT_S)
            except OSError:
                time.sleep(ANVIL_READY_POLL_S)
                continue
            if int(answer, 16) != self.chain_id:
                self.stop()
                raise AnvilError(f"port {port} answers chain id {answer}, not {self.chain_id}")
            return True
        tail = self._log_tail()
        self.stop()
        raise AnvilError(f"anvil not ready on port {port} in {ANVIL_READY_TIMEOUT_S}s:\n{tail}")

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-LOG_TAIL_BYTES:].decode(errors="replace")


# -- web3: connecting, transacting, deploying -------------------------------------------------


def connect(rpc_url: str, timeout_s: float = RPC_TIMEOUT_S) -> Web3:
    return Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout_s}))


def sign_and_send(
    w3: Web3, sender: DevAccount, tx: TxParams, receipt_timeout_s: float = RECEIPT_TIMEOUT_S
) -> TxReceipt:
    """Sign a fully built transaction locally, broadcast it and wait for a successful receipt."""
    signed = Account.sign_transaction(tx, sender.private_key)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(
        tx_hash, timeout=receipt_timeout_s, poll_latency=RECEIPT_POLL_S
    )
    if receipt["status"] != 1:
        raise TransactionFailed(f"transaction 0x{tx_hash.hex()} reverted")
    return receipt


def _base_tx(w3: Web3, sender: DevAccount, value_wei: int) -> TxParams:
    return {
        "from": sender.address,
        "nonce": w3.eth.get_transaction_count(sender.address, "pending"),
        "value": Wei(value_wei),
    }


def transact(w3: Web3, sender: DevAccount, call: ContractFunction, value_wei: int = 0) -> TxReceipt:
    """Send a contract call as a transaction from `sender`; a revert raises (web3's
    ContractLogicError from the gas estimate, with the revert string)."""
    return sign_and_send(w3, sender, call.build_transaction(_base_tx(w3, sender, value_wei)))


def deploy_contract(
    w3: Web3,
    compiled: CompiledContract,
    deployer: DevAccount,
    *constructor_args: Any,
    value_wei: int = 0,
) -> Contract:
    """Deploy `compiled` from `deployer` and return the contract bound to its address."""
    factory = w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
    tx = factory.constructor(*constructor_args).build_transaction(_base_tx(w3, deployer, value_wei))
    receipt = sign_and_send(w3, deployer, tx)
    address = receipt["contractAddress"]
    if address is None or not w3.eth.get_code(address):
        raise TransactionFailed(f"deployment left no code (receipt {receipt!r})")
    return w3.eth.contract(address=address, abi=compiled.abi)
